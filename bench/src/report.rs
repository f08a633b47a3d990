//! Everything one run measured, the target checks, and BENCHMARKS.md.

mod merge;
mod openbao;

use std::fmt::Write as _;
use std::process::Command;

use serde::Serialize;

use crate::bound::{OpensslSpeed, Rates};
use crate::cli::Section;
use crate::config::{BenchConfig, Targets};
use crate::envoy_authz::{Authz, EnvoyAuthz};
use crate::filter_cost::{Kind, NativeCost, WasmCost};
use crate::load::{Generator, Restart, Throughput};
use crate::manifest::MemoryLimit;
use crate::openbao::OpenbaoComparison;
use crate::signer_proc::{LedgerKind, Memory};
use crate::stats::Summary;
use crate::workload::KeyType;

/// The machine and the source the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical cores this process may use.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// `uname -sr`.
    pub kernel: String,
    /// `rustc -V`.
    pub rustc: String,
    /// UTC, RFC 3339.
    pub date: String,
    /// `git rev-parse HEAD` (+ note when the tree has uncommitted changes).
    pub commit: String,
    /// /proc/loadavg when the run started.
    pub loadavg_start: String,
    /// /proc/loadavg when it ended.
    pub loadavg_end: String,
    /// File system of the signer's data dir (the ledger fsyncs there).
    pub data_fs: String,
}

fn cmd(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// /proc/loadavg's first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

impl Machine {
    /// Describe this machine now.
    pub fn describe(data_fs: String) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let commit = match cmd("git", &["rev-parse", "--short=12", "HEAD"]) {
            Some(c) => {
                // The report this run replaces does not count as a change.
                let dirty = cmd(
                    "git",
                    &[
                        "status",
                        "--porcelain",
                        "--untracked-files=no",
                        "--",
                        ".",
                        ":(exclude)BENCHMARKS.md",
                    ],
                )
                .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{c} (with uncommitted changes in the working tree)")
                } else {
                    c
                }
            }
            None => "unknown".to_string(),
        };
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| "unknown".to_string());
        Self {
            cores,
            cpu_model,
            kernel: cmd("uname", &["-sr"]).unwrap_or_else(|| "unknown".to_string()),
            rustc: cmd("rustc", &["-V"]).unwrap_or_else(|| "unknown".to_string()),
            date,
            commit,
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            data_fs,
        }
    }
}

/// One signer throughput row.
#[derive(Debug, Clone, Serialize)]
pub struct SignerRow {
    /// CSR and CA key type.
    pub key: KeyType,
    /// Where the ledger records.
    pub ledger: LedgerKind,
    /// What drove the signer.
    pub load: Generator,
    /// The measurement.
    pub run: Throughput,
}

/// What `skipped` says when the h2load rows could not run.
pub const H2LOAD_ROWS: &str = "signer throughput under h2load";

/// All results of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// `full` or `check`.
    pub mode: &'static str,
    /// Where and when.
    pub machine: Machine,
    /// `openssl speed`.
    pub openssl: Option<OpensslSpeed>,
    /// ring's P-256 rates in this process (the signer's crypto).
    pub ring_p256: Option<Rates>,
    /// Throughput rows.
    pub signer: Vec<SignerRow>,
    /// Throughput runs' `max_concurrent_requests`.
    pub signer_max_concurrent_requests: usize,
    /// Mass restarts (the size first).
    pub restart: Vec<Restart>,
    /// The memory limit the shipped signer StatefulSet sets.
    pub signer_memory_limit: Option<MemoryLimit>,
    /// Native filter cost.
    pub native: Vec<NativeCost>,
    /// Wasm filter cost.
    pub wasm: Vec<WasmCost>,
    /// Size of the `.wasm` (bytes).
    pub wasm_size: Option<u64>,
    /// The rule counts the real-Envoy section was to measure (empty: it
    /// was not to run, so its targets are not checked).
    pub envoy_rules: Vec<usize>,
    /// The filter in real Envoy against Envoy's RBAC and an empty plugin.
    pub envoy_authz: Option<EnvoyAuthz>,
    /// Whether the OpenBao comparison was to run (its targets are checked
    /// only then).
    pub openbao_asked: bool,
    /// The signer against OpenBao's PKI secrets engine.
    pub openbao: Option<OpenbaoComparison>,
    /// Why a part did not run, if one did not.
    pub skipped: Vec<String>,
}

/// One target check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Measured value, formatted.
    pub value: String,
    /// The target, formatted.
    pub target: String,
    /// Met?
    pub ok: bool,
}

impl Check {
    /// One of the real-Envoy section's targets.
    pub fn is_envoy(&self) -> bool {
        self.name.starts_with(ENVOY_CHECK_PREFIX)
    }

    /// One of the OpenBao comparison's targets.
    pub fn is_openbao(&self) -> bool {
        self.name.starts_with(openbao::CHECK_PREFIX)
    }
}

const ENVOY_CHECK_PREFIX: &str = "in Envoy, ";

/// Bound per core for issuing one certificate of `key`: one CSR-signature
/// verify + one certificate signature.
pub fn bound_per_core(openssl: &OpensslSpeed, key: KeyType) -> f64 {
    rates(openssl, key).verify_and_sign_per_s()
}

/// The same bound plus the ES256 service-account token verify the signer
/// also does per request.
pub fn bound_per_core_with_jwt(openssl: &OpensslSpeed, key: KeyType) -> f64 {
    let r = rates(openssl, key);
    1.0 / (1.0 / r.sign_per_s + 1.0 / r.verify_per_s + 1.0 / openssl.p256.verify_per_s)
}

fn rates(openssl: &OpensslSpeed, key: KeyType) -> Rates {
    match key {
        KeyType::P256 => openssl.p256,
        KeyType::Rsa2048 => openssl.rsa2048,
    }
}

/// Signer certs per signer-CPU-second over the bound per core: the bound
/// scaled by the cores the signer actually used in the window.
pub fn ratio_per_used_core(openssl: &OpensslSpeed, row: &SignerRow) -> f64 {
    row.run.certs_per_signer_cpu_s / bound_per_core(openssl, row.key)
}

/// Where one P-256 certificate's signer CPU goes, and the highest ratio the
/// signer could reach if only the crypto and the kernel's part cost
/// anything (every other user-space cost — TLS records, HTTP/2, protobuf,
/// parsing, X.509 building, the ledger's SQLite work, logging — at zero).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuSplit {
    /// Signer CPU per certificate (µs).
    pub total_us: f64,
    /// Of which in the kernel (µs).
    pub kernel_us: f64,
    /// ring's CSR verify + leaf sign (µs), measured in process.
    pub crypto_us: f64,
    /// The rest, in user space (µs).
    pub other_user_us: f64,
    /// The bound's time per certificate (µs): `openssl speed` verify + sign.
    pub bound_us: f64,
    /// `bound_us / (crypto_us + kernel_us)`.
    pub ceiling: f64,
}

impl CpuSplit {
    /// The split of a P-256 row; `None` for other keys or an empty run.
    pub fn of(openssl: &OpensslSpeed, ring: &Rates, row: &SignerRow) -> Option<Self> {
        if row.key != KeyType::P256 || row.run.certs_per_signer_cpu_s <= 0.0 {
            return None;
        }
        let total_us = 1e6 / row.run.certs_per_signer_cpu_s;
        let kernel_us = row.run.signer_kernel_us_per_cert;
        let crypto_us = 1e6 / ring.verify_and_sign_per_s();
        let bound_us = 1e6 / bound_per_core(openssl, KeyType::P256);
        Some(Self {
            total_us,
            kernel_us,
            crypto_us,
            other_user_us: (total_us - kernel_us - crypto_us).max(0.0),
            bound_us,
            ceiling: bound_us / (crypto_us + kernel_us),
        })
    }
}

/// The paragraph under the signer table on its loads: what the h2load rows
/// are, and their signer CPU per certificate next to the Rust load's at the
/// same key, ledger and clients; or why they were not measured.
fn h2load_loads(s: &mut String, r: &Results, config: &BenchConfig) {
    let h2load: Vec<&SignerRow> = r
        .signer
        .iter()
        .filter(|row| matches!(row.load, Generator::H2load(_)))
        .collect();
    let not_measured = r
        .skipped
        .iter()
        .find_map(|x| x.strip_prefix(H2LOAD_ROWS))
        .map(|why| why.trim_start_matches(':').trim());
    let Some(first) = h2load.first() else {
        if let Some(why) = not_measured {
            let _ = writeln!(
                s,
                "\n**h2load rows not measured**: {why}. (`[signer] h2load_concurrency = 0` \
                 turns them off.)"
            );
        }
        return;
    };
    let n = first.run.concurrency;
    let _ = writeln!(
        s,
        "\n**Loads.** *meshward-bench, {n} identities*: the harness's own clients (tonic over \
         rustls, in the bench process) with {n} identities \
         `spiffe://cluster.local/ns/bench-(i mod 64)/sa/sa-i`, each its own ES256 token and \
         P-256 CSR, {n} distinct token-cache entries and namespaces in the ledger and metrics. \
         *h2load, 1 identity*: one h2load process (`-c {n} -m 1 -t 1`, one thread, OpenSSL), \
         every connection sending workload 0's token and CSR — a quick h2load run. \
         *h2load, {n} identities*: {n} h2load processes (`-c 1 -m 1`) started together, process \
         i with the harness's client i's token and CSR — the harness's workload with only the \
         client program changed. Both h2load loads send the same gRPC `CreateCertificate` \
         (5-byte gRPC prefix + protobuf `IstioCertificateRequest`, `content-type: \
         application/grpc`, `te: trailers`, `authorization: Bearer`) over TLS, h2 by ALPN \
         (h2load does not verify the serving certificate), to a fresh signer in the same \
         configuration: a {} warm-up (`-D`) whose rate sizes the measured run (`-n`, about \
         {}; the {n} new connections' TLS handshakes fall inside it). The signer's CPU is read \
         just before the measured processes start and after the last exits; certificates are \
         the signer's own `meshward_signer_requests_total{{outcome=\"issued\"}}` over that \
         span, which must equal h2load's succeeded requests with nothing refused (a gRPC \
         refusal is an HTTP 200 to h2load: with the shipped per-pod rate limit on, a \
         one-identity run is refused `rate_limited` after its burst and h2load still counts \
         every answer a success), or the run fails. *Loadgen cores* of an h2load row \
         are the h2load processes' CPU (reaped children) plus the bench process's; h2load \
         gives no latency percentiles.",
        humantime::format_duration(config.signer.warmup),
        humantime::format_duration(config.signer.window),
    );
    let per_cert = |row: &SignerRow| {
        let t = &row.run;
        let total = if t.certs_per_signer_cpu_s > 0.0 {
            1e6 / t.certs_per_signer_cpu_s
        } else {
            0.0
        };
        format!(
            "{} {total:.0} µs ({:.0} µs kernel, {:.2} signer cores, {:.2} loadgen cores)",
            row.load.label(t.concurrency),
            t.signer_kernel_us_per_cert,
            t.signer_cores,
            t.loadgen_cores
        )
    };
    let same = |a: &SignerRow, b: &SignerRow| {
        a.key == b.key && a.ledger == b.ledger && a.run.concurrency == b.run.concurrency
    };
    let mut compared: Vec<String> = r
        .signer
        .iter()
        .filter(|row| row.load == Generator::Harness && same(row, first))
        .map(per_cert)
        .collect();
    compared.extend(
        h2load
            .iter()
            .filter(|row| same(row, first))
            .map(|row| per_cert(row)),
    );
    let _ = writeln!(
        s,
        "\nSigner CPU per certificate ({}, {} ledger, {n} clients): {}.",
        first.key.label(),
        first.ledger.label(),
        compared.join("; ")
    );
}

/// Signer certs/s over the bound times every core of the machine.
pub fn ratio_machine(openssl: &OpensslSpeed, row: &SignerRow, cores: usize) -> f64 {
    row.run.certs_per_s / (bound_per_core(openssl, row.key) * cores as f64)
}

/// Per-round nanoseconds as "89, 90, 88 ns".
fn round_list(values: &[f64]) -> String {
    if values.is_empty() {
        return "–".to_string();
    }
    let list: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    format!("{} ns", list.join(", "))
}

fn find_native(r: &Results, kind: Kind, rules: usize) -> Option<&NativeCost> {
    r.native.iter().find(|n| n.kind == kind && n.rules == rules)
}

fn find_wasm(r: &Results, kind: Kind, rules: usize) -> Option<&WasmCost> {
    r.wasm.iter().find(|n| n.kind == kind && n.rules == rules)
}

/// The filter-cost rows in report order (HTTP, then network; by rules):
/// each native measurement with the wasm one of the same kind and size.
fn filter_rows(r: &Results) -> impl Iterator<Item = (Kind, &NativeCost, Option<&WasmCost>)> {
    Kind::ALL.into_iter().flat_map(move |kind| {
        r.native
            .iter()
            .filter(move |n| n.kind == kind)
            .map(move |n| (kind, n, find_wasm(r, kind, n.rules)))
    })
}

/// The targets, on what was measured. A target whose inputs were not
/// measured is a failed check (the check says so).
pub fn checks(r: &Results, t: &Targets) -> Vec<Check> {
    let mut out = Vec::new();
    let missing = |name: String, target: String| Check {
        name,
        value: "not measured".to_string(),
        target,
        ok: false,
    };

    // Signer / bound, P-256, SQLite ledger (the shipped configuration).
    let name = "signer / bound, P-256 (best concurrency, per core used)".to_string();
    let target = format!("≥ {:.2}", t.p256_ratio);
    match &r.openssl {
        Some(o) => {
            let best = r
                .signer
                .iter()
                .filter(|row| {
                    row.key == KeyType::P256
                        && row.ledger == LedgerKind::Sqlite
                        && row.load == Generator::Harness
                })
                .map(|row| (ratio_per_used_core(o, row), row.run.concurrency))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            match best {
                Some((ratio, c)) => out.push(Check {
                    name,
                    value: format!("{ratio:.3} (at {c} clients)"),
                    target,
                    ok: ratio >= t.p256_ratio,
                }),
                None => out.push(missing(name, target)),
            }
        }
        None => out.push(missing(name, target)),
    }

    for kind in Kind::ALL {
        let tag = match kind {
            Kind::Http => "HTTP",
            Kind::Network => "network",
        };
        let name = format!("wasm median at {} rules, {tag}", t.flat_from);
        let target = format!("< {:.2} µs", t.wasm_median_us);
        match find_wasm(r, kind, t.flat_from) {
            Some(w) => out.push(Check {
                name,
                value: format!("{:.3} µs", w.decision_ns.p50 / 1e3),
                target,
                ok: w.decision_ns.p50 / 1e3 < t.wasm_median_us,
            }),
            None => out.push(missing(name, target)),
        }

        let name = format!("wasm / native at {} rules, {tag}", t.flat_from);
        let target = format!("≤ {:.1}×", t.wasm_over_native);
        match (
            find_wasm(r, kind, t.flat_from),
            find_native(r, kind, t.flat_from),
        ) {
            (Some(w), Some(n)) => {
                let ratio = w.decision_ns.p50 / n.compiled_ns.p50;
                out.push(Check {
                    name,
                    value: format!("{ratio:.1}×"),
                    target,
                    ok: ratio <= t.wasm_over_native,
                })
            }
            _ => out.push(missing(name, target)),
        }

        for (what, lo, hi) in [
            (
                "native",
                find_native(r, kind, t.flat_from).map(|n| n.compiled_ns.p50),
                find_native(r, kind, t.flat_to).map(|n| n.compiled_ns.p50),
            ),
            (
                "native new identity",
                find_native(r, kind, t.flat_from).map(|n| n.new_identity_ns.p50),
                find_native(r, kind, t.flat_to).map(|n| n.new_identity_ns.p50),
            ),
            (
                "wasm",
                find_wasm(r, kind, t.flat_from).map(|w| w.decision_ns.p50),
                find_wasm(r, kind, t.flat_to).map(|w| w.decision_ns.p50),
            ),
        ] {
            let name = format!(
                "{what} flat {}→{} rules, {tag} (median ratio)",
                t.flat_from, t.flat_to
            );
            let target = format!("≤ {:.2}×", t.flat_ratio);
            match (lo, hi) {
                (Some(lo), Some(hi)) => out.push(Check {
                    name,
                    value: format!("{:.2}×", hi / lo),
                    target,
                    ok: hi / lo <= t.flat_ratio,
                }),
                _ => out.push(missing(name, target)),
            }
        }
    }

    let name = "signer peak resident memory (every signer run)".to_string();
    let (peak, limit) = (peak_signer_memory(r), &r.signer_memory_limit);
    let target = limit.as_ref().map_or_else(
        || "≤ the signer StatefulSet's memory limit".to_string(),
        |l| format!("≤ {} (manifest limit)", l.quantity),
    );
    match (peak, limit) {
        (Some((bytes, during)), Some(l)) => out.push(Check {
            name,
            value: format!("{:.0} MiB ({during})", Memory::mib(bytes)),
            target,
            ok: bytes <= l.bytes,
        }),
        _ => out.push(missing(name, target)),
    }

    let name = ".wasm size".to_string();
    let target = format!("≤ {} KiB", t.wasm_kib);
    match r.wasm_size {
        Some(size) => out.push(Check {
            name,
            value: format!("{:.1} KiB", size as f64 / 1024.0),
            target,
            ok: size <= t.wasm_kib * 1024,
        }),
        None => out.push(missing(name, target)),
    }
    out.extend(envoy_checks(r, t));
    out.extend(openbao::checks(r, t));
    out
}

fn kind_tag(kind: Kind) -> &'static str {
    match kind {
        Kind::Http => "HTTP, per request",
        Kind::Network => "network, per connection",
    }
}

fn us(v: f64) -> String {
    format!("{v:.1} µs")
}

fn ratio_text(num: f64, den: f64) -> String {
    if den > 0.0 {
        format!("{:.2}×", num / den)
    } else {
        "–".to_string()
    }
}

/// The three real-Envoy targets per filter type, on meshward's
/// marginal CPU (over no authorization filter): ≤ RBAC's and ≤ a multiple
/// of the empty plugin's at every rule count, and flat from the smallest
/// rule count to the largest.
fn envoy_checks(r: &Results, t: &Targets) -> Vec<Check> {
    let mut out = Vec::new();
    let rules = &r.envoy_rules;
    let (Some(&lo), Some(&hi)) = (rules.iter().min(), rules.iter().max()) else {
        return out;
    };
    let list = rules
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" / ");
    let marginal =
        |kind: Kind, authz: Authz| r.envoy_authz.as_ref().and_then(|e| e.marginal(kind, authz));
    let missing = |name: String, target: String| Check {
        name,
        value: "not measured".to_string(),
        target,
        ok: false,
    };
    for kind in Kind::ALL {
        let tag = kind_tag(kind);
        for (what, limit, other) in [
            ("Envoy RBAC's", t.envoy_over_rbac, None),
            ("the empty plugin's", t.envoy_over_noop, Some(Authz::Noop)),
        ] {
            let name = format!(
                "{ENVOY_CHECK_PREFIX}{tag}: meshward's marginal CPU / {what}, at {list} rules"
            );
            let target = format!("≤ {limit:.2}× at each");
            let pairs: Option<Vec<(f64, f64)>> = rules
                .iter()
                .map(|&n| {
                    Some((
                        marginal(kind, Authz::Meshward(n))?,
                        marginal(kind, other.unwrap_or(Authz::Rbac(n)))?,
                    ))
                })
                .collect();
            match pairs {
                Some(pairs) => out.push(Check {
                    name,
                    value: pairs
                        .iter()
                        .map(|&(m, o)| format!("{} ({} vs {})", ratio_text(m, o), us(m), us(o)))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    target,
                    ok: pairs.iter().all(|&(m, o)| m <= limit * o),
                }),
                None => out.push(missing(name, target)),
            }
        }
        let name = format!(
            "{ENVOY_CHECK_PREFIX}{tag}: meshward's marginal CPU at {hi} rules / at {lo} rules"
        );
        let target = format!("≤ {:.2}×", t.envoy_flat_ratio);
        match (
            marginal(kind, Authz::Meshward(lo)),
            marginal(kind, Authz::Meshward(hi)),
        ) {
            (Some(a), Some(b)) => out.push(Check {
                name,
                value: format!("{} ({} / {})", ratio_text(b, a), us(b), us(a)),
                target,
                ok: b <= t.envoy_flat_ratio * a,
            }),
            _ => out.push(missing(name, target)),
        }
    }
    out
}

/// The highest peak resident memory of any signer this run started, and
/// which run it was.
fn peak_signer_memory(r: &Results) -> Option<(u64, String)> {
    let throughput = r.signer.iter().filter_map(|row| {
        row.run.signer_memory.map(|m| {
            (
                m.peak_rss,
                format!(
                    "{}, ledger {}, up to {} clients",
                    row.key.label(),
                    row.ledger.label(),
                    row.run.concurrency
                ),
            )
        })
    });
    let restart = r.restart.iter().filter_map(|x| {
        x.signer_memory
            .map(|m| (m.peak_rss, format!("mass restart of {}", x.clients)))
    });
    throughput.chain(restart).max_by_key(|(bytes, _)| *bytes)
}

fn mib(m: Option<Memory>, f: impl Fn(Memory) -> u64) -> String {
    m.map_or("–".to_string(), |m| format!("{:.0}", Memory::mib(f(m))))
}

fn ms(s: &Option<Summary>, f: impl Fn(&Summary) -> f64) -> String {
    s.as_ref()
        .map_or("–".to_string(), |s| format!("{:.2}", f(s)))
}

fn ns(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} µs", v / 1e3)
    } else {
        format!("{v:.0} ns")
    }
}

/// BENCHMARKS.md.
pub fn markdown(r: &Results, config: &BenchConfig, checks: &[Check]) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `scripts/bench` (`meshward-bench run`); do not edit by hand — run `just bench` again.\n"
    );
    let _ = writeln!(s, "| | |\n| --- | --- |");
    let _ = writeln!(s, "| date (UTC) | {} |", m.date);
    let _ = writeln!(s, "| commit | {} |", m.commit);
    let _ = writeln!(s, "| cores | {} |", m.cores);
    let _ = writeln!(s, "| CPU | {} |", m.cpu_model);
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| rustc | {} (release profile, thin LTO) |", m.rustc);
    let _ = writeln!(
        s,
        "| load average (1/5/15 min) | {} at start, {} at end |",
        m.loadavg_start, m.loadavg_end
    );
    let _ = writeln!(s, "| signer data dir file system | {} |", m.data_fs);
    if let Some(o) = &r.openssl {
        let _ = writeln!(s, "| openssl | {} |", o.version);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "The machine is shared (other processes were running: see the load average), so \
         wall-clock rates are lower bounds. CPU-time figures (`openssl speed` rates, \
         certificates per signer CPU-second) are much less affected.\n"
    );

    let _ = writeln!(s, "## Targets\n");
    targets_table(&mut s, checks, &r.skipped);
    if !r.skipped.is_empty() {
        let _ = writeln!(s);
    }

    // 1. Signer.
    let _ = writeln!(s, "## 1. Signer throughput\n");
    let _ = writeln!(
        s,
        "The release `meshward-signer` binary runs as a **child process** (its own tokio \
         runtime and CPU accounting, read from `/proc/<pid>/stat`) on 127.0.0.1 with a \
         fresh built-in CA whose key type is the CSRs' key type, JSON logs at `info`, \
         and `server.max_concurrent_requests = {}` so no request is refused (and the per-pod issuance rate limit off: each client re-asks for its identity in a loop). \
         The load generator (`meshward-bench load`, same machine, same {} cores) opens one TLS \
         connection per client, like one istio-agent each, and sends `CreateCertificate` in a \
         closed loop with a service-account JWT (ES256) and a CSR made before the clock \
         starts. Each figure covers a {} window after a {} warm-up; latency is per request, \
         as the client sees it. Per request the signer checks the JWT (its signature is \
         verified on a client's first request, then found in the verified-token cache, \
         `authn.token_cache_ttl`, as for an istio-agent retrying with its token), verifies the \
         CSR signature, checks the CSR, signs the leaf, records it in the SQLite ledger when \
         the ledger is on (`synchronous=FULL`; a writer thread commits every record waiting \
         in one transaction — while records arrive concurrently it first gathers them for \
         `[ledger] commit_delay`, 1 ms — and answers each request after that commit) and \
         logs it (JSON, through a writer thread). The signer binary allocates with mimalloc.\n",
        r.signer_max_concurrent_requests,
        m.cores,
        humantime::format_duration(config.signer.window),
        humantime::format_duration(config.signer.warmup),
    );
    if let Some(o) = &r.openssl {
        let _ = writeln!(
            s,
            "**Bound** (`openssl speed -seconds {}`, per core, CPU time): P-256 sign {:.0}/s, \
             verify {:.0}/s → one CSR verify + one certificate sign = **{:.0}/s per core**; \
             RSA-2048 sign {:.0}/s, verify {:.0}/s → **{:.0}/s per core**. With an ES256 \
             token verify on every request as well (token cache off): P-256 {:.0}/s, RSA-2048 \
             {:.0}/s per core.\n",
            o.seconds,
            o.p256.sign_per_s,
            o.p256.verify_per_s,
            bound_per_core(o, KeyType::P256),
            o.rsa2048.sign_per_s,
            o.rsa2048.verify_per_s,
            bound_per_core(o, KeyType::Rsa2048),
            bound_per_core_with_jwt(o, KeyType::P256),
            bound_per_core_with_jwt(o, KeyType::Rsa2048),
        );
        let _ = writeln!(
            s,
            "**Ratio.** The signer and the load generator share {} cores (and the machine \
             with other work), so the bound is scaled by the cores the signer *actually \
             used* during the window (its CPU-seconds per second): ratio = certificates per \
             signer CPU-second ÷ bound per core. This is the issuance efficiency against \
             raw crypto; 1.0 would mean TLS, HTTP/2, protobuf, JWT, CSR parsing, X.509 \
             building, the ledger and logging cost nothing. The machine ratio divides \
             wall-clock certs/s by the bound × all {} cores. Ledger commits/s and records per \
             commit come from the signer's own `meshward_signer_ledger_commit_group_size` \
             over the window (one fsync per commit). Resident memory is the signer's \
             `VmRSS` at the window's end and its `VmHWM` (peak since start; one signer serves \
             a key type's concurrencies in this order, so the peak covers the smaller ones too). \
             The **PostgreSQL** row records into `[ledger.postgres]` instead: a PostgreSQL server \
             the bench starts on 127.0.0.1 (same machine, same disk, its data in the system \
             temp dir, server defaults: `fsync` on, the signer's sessions `synchronous_commit = \
             on`), one `INSERT` per group commit over a pooled connection; *database cores* \
             is that server's CPU (the postmaster and its processes) in the window, which the \
             signer's own figures and ratios do not include. The target uses the SQLite rows \
             (the shipped default).\n",
            m.cores, m.cores
        );
    }
    let _ = writeln!(
        s,
        "| key | ledger | load | clients | certs/s | p50 ms | p99 ms | signer cores | loadgen cores | database cores | certs / signer CPU-s | ratio (per used core) | ratio (whole machine) | ledger commits/s | records / commit | RSS MiB | peak RSS MiB | RESOURCE_EXHAUSTED | errors |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in &r.signer {
        let t = &row.run;
        let (rc, rm) = match &r.openssl {
            Some(o) => (
                format!("{:.3}", ratio_per_used_core(o, row)),
                format!("{:.3}", ratio_machine(o, row, m.cores)),
            ),
            None => ("–".to_string(), "–".to_string()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.key.label(),
            row.ledger.label(),
            row.load.label(t.concurrency),
            t.concurrency,
            t.certs_per_s,
            ms(&t.latency_ms, |s| s.p50),
            ms(&t.latency_ms, |s| s.p99),
            t.signer_cores,
            t.loadgen_cores,
            t.database_cores
                .map_or("–".to_string(), |c| format!("{c:.2}")),
            t.certs_per_signer_cpu_s,
            rc,
            rm,
            t.ledger_commits_per_s
                .map_or("–".to_string(), |c| format!("{c:.0}")),
            t.ledger_records_per_commit
                .map_or("–".to_string(), |r| format!("{r:.1}")),
            mib(t.signer_memory, |m| m.rss),
            mib(t.signer_memory, |m| m.peak_rss),
            t.resource_exhausted,
            t.errors,
        );
    }
    h2load_loads(&mut s, r, config);
    if let (Some(o), Some(ring)) = (&r.openssl, &r.ring_p256) {
        let splits: Vec<(&SignerRow, CpuSplit)> = r
            .signer
            .iter()
            .filter_map(|row| CpuSplit::of(o, ring, row).map(|c| (row, c)))
            .collect();
        if !splits.is_empty() {
            let _ = writeln!(
                s,
                "\n**Where a P-256 certificate's signer CPU goes** (µs of signer CPU per \
                 certificate). *Kernel* is the signer's system time: socket calls and TCP on \
                 loopback (there the sender's CPU also delivers each segment to the receiver), \
                 epoll and futex wake-ups, the ledger's WAL writes and fsyncs. *Crypto* is \
                 ring's CSR verify + leaf sign — the calls the signer makes — timed in this \
                 process on one thread: sign {:.0}/s, verify {:.0}/s per CPU-second. \
                 **Ceiling** = the bound's time per certificate ÷ (crypto + kernel): the \
                 ratio the signer would reach if all its other user-space work (TLS records, \
                 HTTP/2, gRPC, protobuf, CSR and PEM parsing, X.509 building, SQLite, \
                 logging) cost nothing.\n",
                ring.sign_per_s, ring.verify_per_s
            );
            let _ = writeln!(
                s,
                "| key | ledger | load | clients | signer CPU / cert | kernel | crypto (ring) | other user space | bound (openssl verify + sign) | ceiling |"
            );
            let _ = writeln!(
                s,
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for (row, c) in splits {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.2} |",
                    row.key.label(),
                    row.ledger.label(),
                    row.load.label(row.run.concurrency),
                    row.run.concurrency,
                    c.total_us,
                    c.kernel_us,
                    c.crypto_us,
                    c.other_user_us,
                    c.bound_us,
                    c.ceiling,
                );
            }
        }
    }
    for row in &r.signer {
        if let Some(e) = &row.run.first_error {
            let _ = writeln!(
                s,
                "\nFirst error ({}, {}, at {} clients): `{e}`",
                row.key.label(),
                row.load.label(row.run.concurrency),
                row.run.concurrency
            );
        }
    }
    let _ = writeln!(s);
    openbao::section(&mut s, r, &config.targets, false);

    // 2. Restart.
    let _ = writeln!(s, "## 2. Mass restart\n");
    match r.restart.first() {
        Some(x) => {
            let _ = writeln!(
                s,
                "N clients ({} CSRs, one TLS connection each, made at the start like a \
                 restarted agent) start at the same instant against a fresh signer with the \
                 default `server.max_concurrent_requests = {}` and `server.max_connections`. \
                 A client answered `RESOURCE_EXHAUSTED` (or failing to connect) waits an \
                 exponential backoff with jitter — attempt k waits uniformly in [d/2, d], \
                 d = min({:.0} ms · {}^k, {:.0} ms), in the spirit of istio-agent's jittered \
                 exponential backoff — and tries again. A connection beyond \
                 `max_connections` waits in the listen backlog until a slot frees (the \
                 signer's `meshward_signer_grpc_connection_limit_waits_total`). Peak memory is \
                 the fresh signer's `VmHWM`.\n",
                config.restart.key_type.label(),
                x.max_concurrent_requests,
                x.backoff.initial.as_secs_f64() * 1e3,
                x.backoff.multiplier,
                x.backoff.max.as_secs_f64() * 1e3,
            );
            let header: String = r
                .restart
                .iter()
                .map(|x| format!(" {} clients |", x.clients))
                .collect();
            let _ = writeln!(s, "| |{header}");
            let _ = writeln!(s, "| --- |{}", " ---: |".repeat(r.restart.len()));
            let row = |s: &mut String, name: &str, f: &dyn Fn(&Restart) -> String| {
                let cells: String = r.restart.iter().map(|x| format!(" {} |", f(x))).collect();
                let _ = writeln!(s, "| {name} |{cells}");
            };
            row(&mut s, "clients holding a certificate", &|x| {
                format!("{} / {}", x.succeeded, x.clients)
            });
            row(&mut s, "time until all hold one", &|x| {
                x.all_done_s
                    .map_or("not all did".to_string(), |v| format!("{v:.2} s"))
            });
            row(&mut s, "time to certificate p50", &|x| {
                format!("{} ms", ms(&x.time_to_cert_ms, |s| s.p50))
            });
            row(&mut s, "time to certificate p99", &|x| {
                format!("{} ms", ms(&x.time_to_cert_ms, |s| s.p99))
            });
            row(
                &mut s,
                "clients answered RESOURCE_EXHAUSTED at least once (and retried)",
                &|x| x.clients_exhausted.to_string(),
            );
            row(&mut s, "RESOURCE_EXHAUSTED answers in total", &|x| {
                x.exhausted_responses.to_string()
            });
            row(&mut s, "failed connection attempts (retried)", &|x| {
                x.connect_failures.to_string()
            });
            row(&mut s, "other failed requests (retried)", &|x| {
                x.other_failures.to_string()
            });
            row(
                &mut s,
                "times the signer's accept loop waited for a connection slot",
                &|x| {
                    x.connection_limit_waits.map_or("–".to_string(), |w| {
                        format!(
                            "{w:.0} (max_connections {})",
                            x.max_connections
                                .map_or("?".to_string(), |m| format!("{m:.0}"))
                        )
                    })
                },
            );
            row(&mut s, "signer CPU during the restart", &|x| {
                format!("{:.2} cores", x.signer_cores)
            });
            let limit = r.signer_memory_limit.as_ref().map_or(String::new(), |l| {
                format!(" (manifest limit {})", l.quantity)
            });
            row(
                &mut s,
                &format!("signer peak resident memory (VmHWM){limit}"),
                &|x| format!("{} MiB", mib(x.signer_memory, |m| m.peak_rss)),
            );
            row(&mut s, "signer resident memory after it (VmRSS)", &|x| {
                format!("{} MiB", mib(x.signer_memory, |m| m.rss))
            });
            for x in &r.restart {
                if let Some(e) = &x.first_error {
                    let _ = writeln!(s, "\nFirst error ({} clients): `{e}`", x.clients);
                }
            }
            let _ = writeln!(s);
        }
        None => {
            let _ = writeln!(s, "Not run.\n");
        }
    }

    // 3. Filter.
    let _ = writeln!(s, "## 3. Filter decision cost\n");
    let _ = writeln!(
        s,
        "In process, in the e2e crate's own proxy-wasm host (wasmtime): this section stays \
         because that host stays (it runs the ABI fault tests Envoy cannot; see ARCHITECTURE.md, \
         e2e). What the filter costs inside real Envoy, against Envoy's RBAC, is section 5.\n"
    );
    let _ = writeln!(
        s,
        "Policies of N rules mixing exact / prefix / suffix principals, namespaces, DENY and \
         AUDIT rules, paths and methods (HTTP) or ports (network) and `maxCertAge` \
         conditions; the peer `{}` is allowed only by the **last** rule (worst case for a \
         scan). A measurement is {} batches of ~{} each, a batch giving the mean time per \
         decision (`std::time::Instant` around the batch); its figures are the median and p99 \
         of its batches. Each measurement ran in {} rounds, every slot (filter type × rule \
         count, native then wasm) once per round, and each wasm round loads the plugin \
         afresh; a figure here is the median of its rounds' figures (the rounds' own medians \
         are listed after the tables), so other work on the machine during one round does not \
         move it.\n\n\
         - **native compiled**: per iteration, what the shim does per decision, natively. \
         HTTP, a request on an established connection: the request view and \
         `PeerRulesCache::authorize` — the peer was parsed when its connection was first \
         seen, and its identity's rules (those whose `from` it satisfies) were computed on \
         its first decision, so only `to` / `when` are evaluated. Network, a new \
         connection: the peer built from the URI SAN as well (its identity from the \
         per-VM identity cache, as the shim does).\n\
         - **native, new identity**: the first decision for an identity not cached yet \
         (SPIFFE parsing, then `Policy::authorize` probing the pattern tables).\n\
         - **native linear**: the new-identity decision with `meshward_filter::reference::authorize`, the \
         naive scan of every rule and every principal (how Envoy's RBAC filter matches \
         principals) — the baseline.\n\
         - **wasm decision**: the release `.wasm` in the e2e proxy-wasm host (wasmtime, \
         Cranelift), timing the callback in which the plugin decides — \
         `proxy_on_request_headers` (HTTP) or `proxy_on_new_connection` (network) — with \
         every host call it makes from there: property and header reads through the ABI \
         (each answer copied into guest memory through its allocator), the clock, removing \
         the deny-reason header, metrics. `Instant` is read around each callback (one clock \
         read, ~20 ns, is inside each figure). HTTP requests arrive on one established \
         connection (one `connection.id`, like requests on a pooled HTTP/2 connection \
         between sidecars): the plugin reads and decodes a connection's facts (mTLS, peer \
         URI SAN, digest, certificate, port) once per connection. The targets use this \
         figure.\n\
         - **wasm decision, new connection** (HTTP): the same, each request on a connection \
         of its own, so every decision also reads the connection's facts.\n\
         - **wasm stream**: a whole stream per iteration — the host opening the context \
         (copying headers and properties into it) and `proxy_on_context_create`, the \
         decision, then `proxy_on_done` / `proxy_on_log` / `proxy_on_delete` — what the \
         plugin plus this host cost per request or connection; a real proxy pays its own \
         bookkeeping differently.\n",
        crate::filter_cost::PEER_URI,
        config.filter.samples,
        humantime::format_duration(config.filter.batch),
        config.filter.rounds,
    );
    let _ = writeln!(
        s,
        "| decision | rules | native compiled p50 | p99 | native, new identity p50 | native linear p50 | linear / new identity | wasm decision p50 | p99 | wasm / native | wasm decision, new connection p50 | wasm stream p50 | p99 |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (kind, n, w) in filter_rows(r) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1}× | {} | {} | {} | {} | {} | {} |",
            kind.label(),
            n.rules,
            ns(n.compiled_ns.p50),
            ns(n.compiled_ns.p99),
            ns(n.new_identity_ns.p50),
            ns(n.linear_ns.p50),
            n.linear_ns.p50 / n.new_identity_ns.p50,
            w.map_or("–".to_string(), |w| ns(w.decision_ns.p50)),
            w.map_or("–".to_string(), |w| ns(w.decision_ns.p99)),
            w.map_or("–".to_string(), |w| format!(
                "{:.1}×",
                w.decision_ns.p50 / n.compiled_ns.p50
            )),
            w.and_then(|w| w.decision_new_connection_ns.as_ref())
                .map_or("–".to_string(), |d| ns(d.p50)),
            w.map_or("–".to_string(), |w| ns(w.stream_ns.p50)),
            w.map_or("–".to_string(), |w| ns(w.stream_ns.p99)),
        );
    }
    let _ = writeln!(s);
    if r.wasm.iter().any(|w| w.abi_floor_ns.n > 0) {
        let _ = writeln!(
            s,
            "**Where the wasm decision's time goes.** The *ABI floor* is `bench/src/abi_floor.wat` \
             timed exactly like the plugin: a module whose callback makes the same host calls the \
             plugin makes for this request or connection (HTTP: the request headers in one \
             `proxy_get_header_map_pairs`, `connection.id`, the clock, two counter increments; \
             network: four `connection.*` / `destination.port` properties, the clock, two \
             increments) and nothing else — every answer still copied in through the guest's \
             allocator (a bump pointer there). It is what any proxy-wasm plugin pays in this host \
             for these reads. *Plugin's own work* = wasm decision − floor: parsing the answers, \
             the caches, the policy, metric bookkeeping, in wasm.\n"
        );
        let _ = writeln!(
            s,
            "| decision | rules | wasm decision p50 | ABI floor p50 | plugin's own work | native compiled p50 | own work / native | floor / native |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (kind, n, w) in filter_rows(r) {
            let Some(w) = w.filter(|w| w.abi_floor_ns.n > 0) else {
                continue;
            };
            let own = (w.decision_ns.p50 - w.abi_floor_ns.p50).max(0.0);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.1}× | {:.1}× |",
                kind.label(),
                n.rules,
                ns(w.decision_ns.p50),
                ns(w.abi_floor_ns.p50),
                ns(own),
                ns(n.compiled_ns.p50),
                own / n.compiled_ns.p50,
                w.abi_floor_ns.p50 / n.compiled_ns.p50,
            );
        }
        let _ = writeln!(s);
    }
    if config.filter.rounds > 1 {
        let _ = writeln!(
            s,
            "**Round to round** (p50 of each round, in the order they ran; the tables above \
             give their median):\n"
        );
        let _ = writeln!(
            s,
            "| decision | rules | native compiled | wasm decision | ABI floor |"
        );
        let _ = writeln!(s, "| --- | ---: | --- | --- | --- |");
        for (kind, n, w) in filter_rows(r) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                kind.label(),
                n.rules,
                round_list(&n.compiled_round_p50_ns),
                w.map_or("–".to_string(), |w| round_list(&w.decision_round_p50_ns)),
                w.map_or("–".to_string(), |w| round_list(&w.abi_floor_round_p50_ns)),
            );
        }
        let _ = writeln!(s);
    }

    // 4. Size and memory.
    let _ = writeln!(s, "## 4. Plugin size and memory\n");
    match r.wasm_size {
        Some(b) => {
            let _ = writeln!(
                s,
                "`target/meshward_filter.wasm` (`scripts/wasm`: `--profile wasm`, wasm-opt when installed): **{b} bytes ({:.1} KiB)**.\n",
                b as f64 / 1024.0
            );
        }
        None => {
            let _ = writeln!(s, "The `.wasm` was not found.\n");
        }
    }
    if !r.wasm.is_empty() {
        let _ = writeln!(
            s,
            "| filter | rules | guest linear memory after configure | instantiate + configure | native compile |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
        for w in &r.wasm {
            let compile = find_native(r, w.kind, w.rules)
                .map_or("–".to_string(), |n| format!("{:.2} ms", n.compile_ms));
            let _ = writeln!(
                s,
                "| {:?} | {} | {:.1} MiB ({} pages) | {:.1} ms | {} |",
                w.kind,
                w.rules,
                w.memory_after_configure as f64 / (1024.0 * 1024.0),
                w.memory_after_configure / 65_536,
                w.configure_ms,
                compile,
            );
        }
        let _ = writeln!(s);
    }
    envoy_section(&mut s, r, config);
    s
}

/// One section alone (`run --only SECTION --output …`): the machine, its
/// targets, its tables.
pub fn markdown_alone(
    section: Section,
    r: &Results,
    config: &BenchConfig,
    checks: &[Check],
) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let title = match section {
        Section::EnvoyAuthz => "The filter in real Envoy (`meshward-bench run --only envoy-authz`)",
        Section::Openbao => "Signer vs OpenBao PKI (`meshward-bench run --only openbao`)",
    };
    let _ = writeln!(s, "# {title}\n");
    let _ = writeln!(
        s,
        "{}, commit {}, {} cores ({}), load average {} at start, {} at end.\n",
        m.date, m.commit, m.cores, m.cpu_model, m.loadavg_start, m.loadavg_end
    );
    targets_table(&mut s, checks, &r.skipped);
    section_body(&mut s, section, r, config, false);
    s
}

fn section_body(
    s: &mut String,
    section: Section,
    r: &Results,
    config: &BenchConfig,
    standalone: bool,
) {
    match section {
        Section::EnvoyAuthz => envoy_section(s, r, config),
        Section::Openbao => openbao::section(s, r, &config.targets, standalone),
    }
}

/// `existing` (a full BENCHMARKS.md) with `section`'s part and target rows
/// replaced by this run's (`run --only SECTION --merge`).
pub fn merge_section(
    existing: &str,
    section: Section,
    r: &Results,
    config: &BenchConfig,
    checks: &[Check],
) -> String {
    let part = match section {
        Section::EnvoyAuthz => merge::Part {
            heading: ENVOY_HEADING,
            before: None,
            check_prefix: ENVOY_CHECK_PREFIX,
        },
        Section::Openbao => merge::Part {
            heading: openbao::HEADING,
            before: Some(openbao::BEFORE),
            check_prefix: openbao::CHECK_PREFIX,
        },
    };
    let mut body = String::new();
    section_body(&mut body, section, r, config, true);
    let rows: Vec<String> = checks.iter().map(target_row).collect();
    merge::splice(existing, &part, &body, &rows)
}

const ENVOY_HEADING: &str = "## 5. The filter in real Envoy vs Envoy RBAC";

fn envoy_section(s: &mut String, r: &Results, config: &BenchConfig) {
    let _ = writeln!(s, "{ENVOY_HEADING}\n");
    let Some(e) = &r.envoy_authz else {
        let _ = writeln!(
            s,
            "Not run{}.\n",
            if r.envoy_rules.is_empty() {
                " (`[envoy] enabled = false`)"
            } else {
                ": see the targets' notes"
            }
        );
        return;
    };
    let c = &config.envoy;
    let _ = writeln!(
        s,
        "`{}`; `{}`. One **server Envoy** (`--concurrency 1`) on the e2e crate's Istio-like \
         sidecar bootstrap: `virtualInbound` with `tls_inspector` and downstream mTLS (client \
         certificate required, validated against the signer's roots; both secrets over file \
         SDS as istio-agent writes them), the manifests' XFCC EnvoyFilter merged into the \
         connection manager. Every request is answered by a `direct_response` route (200, \
         3 bytes), not an app: with no upstream pool and no app process competing for the \
         {} cores, the server's CPU is only TLS, the codec, the connection manager and the \
         filter under test, so a filter's share is as large as it gets. **Load**: h2load \
         (`-c {} -m {} -t 1`, HTTP/2 cleartext) into a **client Envoy** (`--concurrency 1`) \
         that originates mTLS with a certificate the signer issued to \
         `spiffe://cluster.local/ns/{}/sa/{}` (the e2e agent: P-256 CSR over the Istio CA API) \
         and checks the server's SPIFFE ID. *Per request* (HTTP filters): HTTP/2 from the \
         client Envoy, one pooled connection. *Per connection* (network filters): one HTTP/1.1 \
         request per new TLS connection (`max_requests_per_connection: 1`; Envoy's default TLS \
         session resumption left on at both ends, as in a mesh). Everything on the same \
         machine, loopback{}.\n",
        e.envoy_version,
        e.h2load_version,
        r.machine.cores,
        c.clients,
        c.streams,
        crate::envoy_authz::CLIENT.0,
        crate::envoy_authz::CLIENT.1,
        match &e.pins {
            Some(p) => format!(
                "; the server Envoy pinned to CPU {} (`taskset -a`, every thread), the client \
                 Envoy and h2load to CPU {}, so that the server's CPU per request is its own \
                 core's, not inflated by sharing a core (and its caches) with the load",
                p.server, p.load
            ),
            None => ", not pinned to CPUs".to_string(),
        },
    );
    let _ = writeln!(
        s,
        "**Configurations** (the client is allowed only by the **last** rule or policy): \
         (a) *none*; (b) *Envoy RBAC*, `envoy.filters.http.rbac` / `envoy.filters.network.rbac` \
         with N ALLOW policies, each `permissions: [{{any: true}}]` and one \
         `authenticated.principal_name` principal, alternately `exact` \
         (`spiffe://cluster.local/ns/app-i/sa/web`) and `prefix` \
         (`spiffe://cluster.local/ns/team-i/`), as istiod generates them from \
         AuthorizationPolicy principals, named so the client's sorts last (Envoy tries \
         policies in name order and stops at the first match); (c) *meshward*, \
         `istio-manifests/wasmplugin/wasmplugin-{{http,network}}.yaml` turned into the Envoy \
         filter istiod generates (V8, FAIL_CLOSE) with the same N rules as `principals` \
         (`cluster.local/ns/app-i/sa/web`, `cluster.local/ns/team-i/*`); (d) *empty plugin*, \
         `bench/noop-plugin` from the same manifests: a proxy-wasm plugin that only returns \
         Continue, built like the filter (Rust proxy-wasm SDK 0.2, wasm32-wasip1, the `wasm` \
         profile, wasm-metadce to the callbacks it needs, wasm-opt -O3; {} bytes) — what any \
         Rust plugin pays in Envoy's V8 per request or connection. A run in which anything \
         but 2xx came back (h2load's status codes, the server's `downstream_rq_2xx`) fails \
         the benchmark.\n",
        e.noop_wasm_size,
    );
    let _ = writeln!(
        s,
        "**Measurement.** Per round and filter type, a fresh server and client Envoy for \
         every configuration, each warmed up by {} of h2load, then the measured runs{}, each \
         server left to go idle before: the server Envoy's CPU (the sum of its threads' run \
         time from `/proc/<pid>/task/*/schedstat`, in ns; its PID only) from before the run \
         until it is idle again, divided by the requests (HTTP) or connections (network) the \
         server itself counted. *Marginal* = a configuration's CPU minus (a)'s in the same \
         round. {} interleaved round(s), every configuration once per round; figures are \
         medians of the rounds. Requests/s is h2load's, on {} cores shared with the client \
         Envoy and h2load. Load average {} when the section started, {} when it ended; each \
         round's (1 min) is listed.\n",
        humantime::format_duration(c.warmup),
        if c.http_rate == 0 && c.network_rate == 0 {
            format!(
                ": each configuration alone, closed loop (h2load's fixed concurrency, the \
                 warm-up's rate sizing the run to about {}, at least {} requests)",
                humantime::format_duration(c.window),
                c.min_requests
            )
        } else {
            format!(
                ": every configuration that sustains it at a fixed rate ({} requests/s per HTTP \
                 configuration, {} connections/s per network one), all at once, each under its \
                 own h2load for about {}, their CPUs read over the same interval — so a change in \
                 the machine's speed moves them alike and cancels out of the marginals, and \
                 every request finds the caches as cold as on a busy node; the others alone, \
                 closed loop",
                c.http_rate,
                c.network_rate,
                humantime::format_duration(c.window)
            )
        },
        c.rounds,
        r.machine.cores,
        e.loadavg_start,
        e.loadavg_end,
    );
    for kind in Kind::ALL {
        let unit = match kind {
            Kind::Http => "request",
            Kind::Network => "connection",
        };
        let _ = writeln!(s, "**{}**\n", kind_tag(kind));
        let _ = writeln!(
            s,
            "| filter | rules | requests/s | server CPU / {unit} | marginal over none | each round: CPU (marginal) | load avg |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | --- | --- |");
        for row in e.rows.iter().filter(|row| row.kind == kind) {
            let rounds = row
                .samples
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let m = row
                        .round_marginal_us
                        .get(i)
                        .filter(|_| row.authz != Authz::None)
                        .map_or(String::new(), |m| format!(" ({m:+.1})"));
                    format!("{:.1}{m}", x.cpu_us)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let load = row
                .samples
                .iter()
                .map(|x| x.loadavg.clone())
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {} | {} µs | {} |",
                row.authz.label(),
                row.authz.rules().map_or("–".to_string(), |n| n.to_string()),
                row.requests_per_s,
                us(row.cpu_us),
                row.marginal_us
                    .map_or("–".to_string(), |m| format!("{m:+.1} µs")),
                rounds,
                load,
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "**Where meshward's marginal CPU goes**: the empty plugin's marginal is what V8 and \
         the SDK cost for a plugin that does nothing (context creation, the callbacks, the \
         context's end); meshward − empty plugin is its own work in Envoy (property and \
         header reads through the ABI, the decision, metrics).\n"
    );
    let _ = writeln!(
        s,
        "| filter type | rules | empty plugin | meshward − empty plugin | meshward | Envoy RBAC | meshward / RBAC |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for kind in Kind::ALL {
        let noop = e.marginal(kind, Authz::Noop);
        for &n in &r.envoy_rules {
            let m = e.marginal(kind, Authz::Meshward(n));
            let rbac = e.marginal(kind, Authz::Rbac(n));
            let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:+.1} µs"));
            let _ = writeln!(
                s,
                "| {} | {n} | {} | {} | {} | {} | {} |",
                kind_tag(kind),
                cell(noop),
                cell(m.zip(noop).map(|(m, o)| m - o)),
                cell(m),
                cell(rbac),
                m.zip(rbac)
                    .map_or("–".to_string(), |(m, b)| ratio_text(m, b)),
            );
        }
    }
    let _ = writeln!(s);
}

/// One row of the targets table.
fn target_row(c: &Check) -> String {
    format!(
        "| {} | {} | {} | {} |",
        c.name,
        c.value,
        c.target,
        if c.ok { "yes" } else { "**no**" }
    )
}

/// The target checks as a table, then what was not measured.
fn targets_table(s: &mut String, checks: &[Check], skipped: &[String]) {
    let _ = writeln!(
        s,
        "| target | measured | wanted | met |\n| --- | --- | --- | --- |"
    );
    for c in checks {
        let _ = writeln!(s, "{}", target_row(c));
    }
    let _ = writeln!(s);
    for k in skipped {
        let _ = writeln!(s, "- not measured: {k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Throughput;

    fn openssl() -> OpensslSpeed {
        OpensslSpeed {
            version: "test".to_string(),
            seconds: 1,
            p256: Rates {
                sign_per_s: 30_000.0,
                verify_per_s: 15_000.0,
            },
            rsa2048: Rates {
                sign_per_s: 2_000.0,
                verify_per_s: 60_000.0,
            },
        }
    }

    fn row(certs_per_s: f64, signer_cores: f64) -> SignerRow {
        SignerRow {
            key: KeyType::P256,
            ledger: LedgerKind::Sqlite,
            load: Generator::Harness,
            run: Throughput {
                concurrency: 64,
                issued: 0,
                window_s: 1.0,
                certs_per_s,
                latency_ms: None,
                signer_cores,
                loadgen_cores: 0.0,
                database_cores: None,
                certs_per_signer_cpu_s: certs_per_s / signer_cores,
                signer_kernel_us_per_cert: 20.0,
                ledger_commits_per_s: None,
                ledger_records_per_commit: None,
                signer_memory: Some(Memory {
                    rss: 30 << 20,
                    peak_rss: 40 << 20,
                }),
                resource_exhausted: 0,
                errors: 0,
                first_error: None,
            },
        }
    }

    #[test]
    fn ratio_scales_the_bound_by_the_cores_the_signer_used() {
        // Bound: 1/(1/30000 + 1/15000) = 10 000 per core.
        let o = openssl();
        assert!((bound_per_core(&o, KeyType::P256) - 10_000.0).abs() < 1e-6);
        // 8 000 certs/s on 1.0 core = 0.8; on 2 cores (of 2) = 0.4 either way.
        assert!((ratio_per_used_core(&o, &row(8_000.0, 1.0)) - 0.8).abs() < 1e-9);
        assert!((ratio_per_used_core(&o, &row(8_000.0, 2.0)) - 0.4).abs() < 1e-9);
        assert!((ratio_machine(&o, &row(8_000.0, 1.0), 2) - 0.4).abs() < 1e-9);
    }

    #[test]
    fn h2load_rows_are_labelled_explained_and_kept_out_of_the_target() {
        use crate::load::h2load::Identities;
        let config = BenchConfig::defaults().unwrap();
        let harness = row(4_000.0, 1.0);
        let mut one = row(9_000.0, 1.0);
        one.load = Generator::H2load(Identities::One);
        let mut many = row(4_100.0, 1.0);
        many.load = Generator::H2load(Identities::PerClient);
        let measured = results(vec![harness, one, many]);
        // The target is the Rust load's: 0.4, not h2load's 0.9.
        let checks = checks(&measured, &config.targets);
        assert_eq!(checks[0].value, "0.400 (at 64 clients)");
        let text = markdown(&measured, &config, &checks);
        for label in [
            "| P-256 | SQLite | meshward-bench, 64 identities | 64 |",
            "| P-256 | SQLite | h2load, 1 identity | 64 |",
            "| P-256 | SQLite | h2load, 64 identities | 64 |",
        ] {
            assert!(text.contains(label), "{label}\n{text}");
        }
        assert!(text.contains("**Loads.**"), "{text}");
        assert!(
            text.contains(
                "meshward-bench, 64 identities 250 µs (20 µs kernel, 1.00 signer cores, \
                 0.00 loadgen cores); h2load, 1 identity 111 µs"
            ),
            "{text}"
        );

        // Not measured: the report says why.
        let missing = Results {
            skipped: vec![format!("{H2LOAD_ROWS}: running h2load: No such file")],
            ..results(vec![row(4_000.0, 1.0)])
        };
        let text = markdown(&missing, &config, &[]);
        assert!(
            text.contains("**h2load rows not measured**: running h2load: No such file."),
            "{text}"
        );
        assert!(!text.contains("**Loads.**"));
        // Off: nothing about it.
        assert!(!markdown(&results(Vec::new()), &config, &[]).contains("h2load rows"));
    }

    #[test]
    fn cpu_split_ceiling_counts_only_crypto_and_kernel() {
        let o = openssl();
        // ring: 1/(1/40000 + 1/20000) = 13 333/s → 75 µs of crypto per cert.
        let ring = Rates {
            sign_per_s: 40_000.0,
            verify_per_s: 20_000.0,
        };
        // 5 000 certs per CPU-second = 200 µs, of which 20 µs in the kernel.
        let c = CpuSplit::of(&o, &ring, &row(5_000.0, 1.0)).unwrap();
        assert!((c.total_us - 200.0).abs() < 1e-6);
        assert!((c.crypto_us - 75.0).abs() < 1e-6);
        assert!((c.other_user_us - 105.0).abs() < 1e-6);
        // Bound 10 000/s = 100 µs; ceiling 100 / (75 + 20).
        assert!((c.ceiling - 100.0 / 95.0).abs() < 1e-9);
        let mut rsa = row(5_000.0, 1.0);
        rsa.key = KeyType::Rsa2048;
        assert!(CpuSplit::of(&o, &ring, &rsa).is_none());
    }

    /// Results of a `--check` run with these signer rows and nothing else.
    fn results(signer: Vec<SignerRow>) -> Results {
        Results {
            mode: "check",
            machine: Machine::describe("ext4".to_string()),
            openssl: Some(openssl()),
            ring_p256: None,
            signer,
            signer_max_concurrent_requests: 1024,
            restart: Vec::new(),
            signer_memory_limit: None,
            native: Vec::new(),
            wasm: Vec::new(),
            wasm_size: None,
            envoy_rules: Vec::new(),
            envoy_authz: None,
            openbao_asked: false,
            openbao: None,
            skipped: Vec::new(),
        }
    }

    fn limit(quantity: &str) -> MemoryLimit {
        MemoryLimit {
            quantity: quantity.to_string(),
            bytes: crate::manifest::parse_quantity(quantity).unwrap(),
            source: "test".to_string(),
        }
    }

    #[test]
    fn unmeasured_targets_fail_their_check() {
        let results = Results {
            wasm_size: Some(300 * 1024),
            ..results(vec![row(9_000.0, 1.0)])
        };
        let targets = BenchConfig::defaults().unwrap().targets;
        let checks = checks(&results, &targets);
        let by = |prefix: &str| checks.iter().find(|c| c.name.starts_with(prefix)).unwrap();
        assert!(by("signer / bound").ok);
        assert!(by(".wasm size").ok);
        // No manifest limit to compare with: not measured, so not met.
        assert!(!by("signer peak resident memory").ok);
        let wasm = by("wasm median");
        assert!(!wasm.ok);
        assert_eq!(wasm.value, "not measured");
    }

    #[test]
    fn signer_peak_memory_above_the_manifest_limit_fails_its_check() {
        let mut big = row(9_000.0, 1.0);
        big.run.concurrency = 512;
        big.run.signer_memory = Some(Memory {
            rss: 50 << 20,
            peak_rss: 70 << 20,
        });
        let mut results = results(vec![row(9_000.0, 1.0), big]);
        let targets = BenchConfig::defaults().unwrap().targets;
        let memory = |r: &Results| {
            checks(r, &targets)
                .into_iter()
                .find(|c| c.name.starts_with("signer peak resident memory"))
                .unwrap()
        };
        results.signer_memory_limit = Some(limit("64Mi"));
        let over = memory(&results);
        assert!(!over.ok, "{over:?}");
        assert_eq!(
            over.value,
            "70 MiB (P-256, ledger SQLite, up to 512 clients)"
        );
        results.signer_memory_limit = Some(limit("70Mi"));
        assert!(memory(&results).ok);
    }

    fn envoy_row(
        kind: Kind,
        authz: Authz,
        cpu_us: f64,
        marginal: Option<f64>,
    ) -> crate::envoy_authz::Row {
        crate::envoy_authz::Row {
            kind,
            authz,
            samples: Vec::new(),
            requests_per_s: 1000.0,
            cpu_us,
            marginal_us: marginal,
            round_marginal_us: marginal.into_iter().collect(),
        }
    }

    #[test]
    fn envoy_targets_compare_meshward_with_rbac_the_empty_plugin_and_itself() {
        let mut rows = Vec::new();
        for kind in Kind::ALL {
            rows.push(envoy_row(kind, Authz::None, 20.0, None));
            rows.push(envoy_row(kind, Authz::Rbac(10), 31.0, Some(11.0)));
            rows.push(envoy_row(
                kind,
                Authz::Rbac(10_000),
                11_780.0,
                Some(11_760.0),
            ));
            rows.push(envoy_row(kind, Authz::Meshward(10), 29.5, Some(9.5)));
            rows.push(envoy_row(kind, Authz::Meshward(10_000), 32.5, Some(12.5)));
            rows.push(envoy_row(kind, Authz::Noop, 27.0, Some(7.0)));
        }
        let results = Results {
            envoy_rules: vec![10, 10_000],
            envoy_authz: Some(EnvoyAuthz {
                envoy_version: "envoy 1.40.0".to_string(),
                h2load_version: "h2load nghttp2/1.64.0".to_string(),
                noop_wasm_size: 50_000,
                pins: None,
                loadavg_start: "1.0".to_string(),
                loadavg_end: "1.0".to_string(),
                rows,
            }),
            ..results(vec![row(9_000.0, 1.0)])
        };
        let config = BenchConfig::defaults().unwrap();
        let envoy: Vec<Check> = checks(&results, &config.targets)
            .into_iter()
            .filter(Check::is_envoy)
            .collect();
        assert_eq!(envoy.len(), 6, "{envoy:#?}");
        let by = |part: &str| envoy.iter().find(|c| c.name.contains(part)).unwrap();
        let rbac = by("HTTP, per request: meshward's marginal CPU / Envoy RBAC's");
        assert!(rbac.ok, "{rbac:?}");
        assert_eq!(
            rbac.value,
            "0.86× (9.5 µs vs 11.0 µs) / 0.00× (12.5 µs vs 11760.0 µs)"
        );
        // 12.5 > 1.5 × 7.0; 12.5 / 9.5 = 1.32 > 1.2.
        assert!(!by("HTTP, per request: meshward's marginal CPU / the empty plugin's").ok);
        let flat = by("HTTP, per request: meshward's marginal CPU at 10000 rules / at 10 rules");
        assert!(!flat.ok);
        assert_eq!(flat.value, "1.32× (12.5 µs / 9.5 µs)");
        let text = markdown(&results, &config, &envoy);
        assert!(
            text.contains("## 5. The filter in real Envoy vs Envoy RBAC"),
            "{text}"
        );
        assert!(
            text.contains("| meshward (V8) | 10000 | 1000 | 32.5 µs | +12.5 µs |"),
            "{text}"
        );

        // Not run although asked for: every one of them fails as not measured.
        let missing = Results {
            envoy_authz: None,
            ..results
        };
        let envoy: Vec<Check> = checks(&missing, &config.targets)
            .into_iter()
            .filter(Check::is_envoy)
            .collect();
        assert_eq!(envoy.len(), 6);
        assert!(envoy.iter().all(|c| !c.ok && c.value == "not measured"));
    }

    fn openbao_sample(round: usize, per_cpu_s: f64, errors: u64) -> crate::openbao::Sample {
        crate::openbao::Sample {
            round,
            issued: 1000,
            certs_per_s: per_cpu_s,
            latency_ms: None,
            server_cores: 1.0,
            loadgen_cores: 0.5,
            certs_per_server_cpu_s: per_cpu_s,
            server_kernel_us_per_cert: 30.0,
            server_peak_rss: Some(100 << 20),
            errors,
            first_error: (errors > 0).then(|| "503 Service Unavailable".to_string()),
            loadavg: "1.0".to_string(),
        }
    }

    fn openbao_results(dev_errors: u64) -> Results {
        use crate::openbao::{OpenbaoComparison, Server, aggregate, slots};
        let slots = slots(&[64], 64);
        let per_cpu = |server: Server| match server {
            Server::Meshward => 4400.0,
            Server::OpenbaoDev => 800.0,
            Server::OpenbaoRaft => 550.0,
        };
        let samples: Vec<_> = slots
            .iter()
            .map(|&c| {
                let errors = if c.server == Server::OpenbaoDev && c.stored {
                    dev_errors
                } else {
                    0
                };
                (c, openbao_sample(1, per_cpu(c.server), errors))
            })
            .collect();
        Results {
            openbao_asked: true,
            openbao: Some(OpenbaoComparison {
                bao_version: "OpenBao v2.7.2".to_string(),
                loadavg_start: "1.0".to_string(),
                loadavg_end: "1.1".to_string(),
                date: "2026-12-07T00:00:00Z".to_string(),
                window_s: 4.0,
                warmup_s: 1.0,
                rounds: 1,
                rows: aggregate(&slots, &samples),
            }),
            ..results(vec![row(9_000.0, 1.0)])
        }
    }

    #[test]
    fn openbao_targets_compare_certificates_per_server_cpu_second_at_64_clients() {
        let config = BenchConfig::defaults().unwrap();
        let results = openbao_results(0);
        let checks: Vec<Check> = checks(&results, &config.targets)
            .into_iter()
            .filter(Check::is_openbao)
            .collect();
        assert_eq!(checks.len(), 2, "{checks:#?}");
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        assert_eq!(checks[0].value, "5.50× (4400 vs 800; rounds 5.50×)");
        assert!(checks[1].name.contains("raft storage (on disk)"));
        let text = markdown(&results, &config, &checks);
        assert!(text.contains("### Signer vs OpenBao PKI"), "{text}");
        assert!(
            text.contains("| 64 | every certificate | 4400 | 800 | 550 | 5.50× | 8.00× |"),
            "{text}"
        );
        assert!(
            text.contains("| 64 | nothing | 4400 | 800 | 550 |"),
            "{text}"
        );
        // Section 1, then this, then section 2.
        let (one, bao, two) = (
            text.find("## 1. Signer throughput").unwrap(),
            text.find("### Signer vs OpenBao PKI").unwrap(),
            text.find("## 2. Mass restart").unwrap(),
        );
        assert!(one < bao && bao < two);

        // Failed requests void the comparison; not run fails as not measured.
        let failing = checks_of(&openbao_results(3), &config);
        assert!(!failing[0].ok && failing[0].value.ends_with("; 3 failed requests"));
        assert!(failing[1].ok);
        let missing = Results {
            openbao: None,
            skipped: vec!["signer vs OpenBao PKI: no bao".to_string()],
            ..openbao_results(0)
        };
        let none = checks_of(&missing, &config);
        assert!(none.iter().all(|c| !c.ok && c.value == "not measured"));
        assert!(markdown(&missing, &config, &none).contains("Not run: no bao."));
        // Not asked for: no targets.
        let off = Results {
            openbao_asked: false,
            ..missing
        };
        assert!(checks_of(&off, &config).is_empty());
    }

    fn checks_of(r: &Results, config: &BenchConfig) -> Vec<Check> {
        checks(r, &config.targets)
            .into_iter()
            .filter(Check::is_openbao)
            .collect()
    }

    #[test]
    fn merging_the_openbao_section_replaces_only_its_part() {
        let config = BenchConfig::defaults().unwrap();
        let old = Results {
            openbao_asked: true,
            openbao: None,
            ..results(vec![row(9_000.0, 1.0)])
        };
        let old_checks = checks(&old, &config.targets);
        let before = markdown(&old, &config, &old_checks);
        let new = openbao_results(0);
        let new_checks = checks_of(&new, &config);
        let merged = merge_section(&before, Section::Openbao, &new, &config, &new_checks);
        assert!(merged.contains("| 64 | every certificate | 4400 | 800 | 550 | 5.50× | 8.00× |"));
        assert!(
            merged.contains("Measured 2026-12-07T00:00:00Z by `meshward-bench run --only openbao`")
        );
        let rows: Vec<&str> = merged
            .lines()
            .filter(|l| l.starts_with("| vs OpenBao PKI, "))
            .collect();
        assert_eq!(rows.len(), 2, "{merged}");
        assert!(rows.iter().all(|l| l.ends_with("| yes |")), "{rows:?}");
        // Everything outside the section and its target rows is unchanged.
        let strip = |t: &str| {
            let start = t.find("### Signer vs OpenBao PKI").unwrap();
            let end = t.find("## 2. Mass restart").unwrap();
            let mut rest = format!("{}{}", &t[..start], &t[end..]);
            rest.retain(|c| c != '\r');
            rest.lines()
                .filter(|l| !l.starts_with("| vs OpenBao PKI, "))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&merged), strip(&before));
    }

    fn restart(clients: usize, peak_mib: u64, waits: f64) -> Restart {
        let mut times: Vec<f64> = (1..=clients).map(|i| i as f64).collect();
        Restart {
            clients,
            max_concurrent_requests: 256,
            backoff: crate::load::Backoff {
                initial: std::time::Duration::from_millis(100),
                max: std::time::Duration::from_secs(5),
                multiplier: 2.0,
            },
            succeeded: clients,
            all_done_s: Some(clients as f64 / 1e3),
            time_to_cert_ms: Summary::of(&mut times),
            clients_exhausted: 0,
            exhausted_responses: 0,
            connect_failures: 0,
            other_failures: 0,
            first_error: None,
            signer_cores: 1.0,
            signer_memory: Some(Memory {
                rss: 20 << 20,
                peak_rss: peak_mib << 20,
            }),
            connection_limit_waits: Some(waits),
            max_connections: Some(8192.0),
        }
    }

    #[test]
    fn every_restart_size_gets_a_column_and_the_largest_peak_is_checked() {
        let results = Results {
            mode: "full",
            openssl: None,
            restart: vec![restart(2_000, 110, 0.0), restart(10_000, 350, 1735.0)],
            signer_memory_limit: Some(limit("512Mi")),
            ..results(vec![row(9_000.0, 1.0)])
        };
        let config = BenchConfig::defaults().unwrap();
        let checks = checks(&results, &config.targets);
        let text = markdown(&results, &config, &checks);
        assert!(
            text.contains("| | 2000 clients | 10000 clients |\n"),
            "{text}"
        );
        assert!(text.contains("| clients holding a certificate | 2000 / 2000 | 10000 / 10000 |"));
        assert!(text.contains(
            "| times the signer's accept loop waited for a connection slot | 0 (max_connections 8192) | 1735 (max_connections 8192) |"
        ));
        assert!(text.contains(
            "| signer peak resident memory (VmHWM) (manifest limit 512Mi) | 110 MiB | 350 MiB |"
        ));
        let memory = checks
            .iter()
            .find(|c| c.name.starts_with("signer peak resident memory"))
            .unwrap();
        assert!(memory.ok);
        assert_eq!(memory.value, "350 MiB (mass restart of 10000)");
    }
}
