//! The signer vs OpenBao PKI part of BENCHMARKS.md (a subsection of the
//! signer's section 1) and its targets.

use std::fmt::Write as _;

use super::{Check, Results, ms};
use crate::config::Targets;
use crate::openbao::{Cell, OpenbaoComparison, Row, Server};

/// Every OpenBao target's name starts so (`run --only openbao` keeps them).
pub const CHECK_PREFIX: &str = "vs OpenBao PKI, ";
/// The subsection's heading (what `--merge` replaces).
pub const HEADING: &str = "### Signer vs OpenBao PKI";
/// Where the subsection goes when a report has none yet.
pub const BEFORE: &str = "## 2. ";
/// What `skipped` says when the section failed.
pub const SKIPPED_PREFIX: &str = "signer vs OpenBao PKI: ";

fn storage_words(server: Server) -> &'static str {
    match server {
        Server::Meshward => "meshward",
        Server::OpenbaoDev => "OpenBao's, dev server (in memory)",
        Server::OpenbaoRaft => "OpenBao's, raft storage (on disk)",
    }
}

/// meshward's certificates per server CPU-second over each OpenBao
/// server's, every certificate recorded, at `targets.openbao_clients`
/// clients, at least `targets.openbao_ratio`; a cell with failed requests
/// fails its check (its figures would flatter one side).
pub fn checks(r: &Results, t: &Targets) -> Vec<Check> {
    if !r.openbao_asked {
        return Vec::new();
    }
    let clients = t.openbao_clients;
    let cell = |server| Cell {
        server,
        stored: true,
        clients,
    };
    Server::OPENBAO
        .into_iter()
        .map(|server| {
            let name = format!(
                "{CHECK_PREFIX}P-256 at {clients} clients, every certificate recorded: meshward's \
                 certificates per server CPU-second / {}",
                storage_words(server)
            );
            let target = format!("≥ {:.2}×", t.openbao_ratio);
            let rows = r
                .openbao
                .as_ref()
                .and_then(|o| Some((o.row(cell(Server::Meshward))?, o.row(cell(server))?)));
            match rows {
                Some((m, b)) => match b.meshward_ratio {
                    Some(ratio) => {
                        let errors = m.errors + b.errors;
                        let mut value = format!(
                            "{ratio:.2}× ({:.0} vs {:.0}; rounds {})",
                            m.certs_per_server_cpu_s,
                            b.certs_per_server_cpu_s,
                            ratio_list(&b.round_ratios)
                        );
                        if errors > 0 {
                            let _ = write!(value, "; {errors} failed requests");
                        }
                        Check {
                            name,
                            value,
                            target,
                            ok: errors == 0 && ratio >= t.openbao_ratio,
                        }
                    }
                    None => Check {
                        name,
                        value: "no certificate issued".to_string(),
                        target,
                        ok: false,
                    },
                },
                None => Check {
                    name,
                    value: "not measured".to_string(),
                    target,
                    ok: false,
                },
            }
        })
        .collect()
}

fn ratio_list(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".to_string();
    }
    v.iter()
        .map(|x| format!("{x:.2}×"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn recorded(stored: bool) -> &'static str {
    if stored {
        "every certificate"
    } else {
        "nothing"
    }
}

/// The subsection. `standalone`: it was measured by `run --only openbao`,
/// apart from the rest of the report, so it says when.
pub fn section(s: &mut String, r: &Results, t: &Targets, standalone: bool) {
    let _ = writeln!(s, "{HEADING}\n");
    let Some(o) = &r.openbao else {
        let why = r
            .skipped
            .iter()
            .find_map(|k| k.strip_prefix(SKIPPED_PREFIX))
            .map_or_else(
                || {
                    if r.openbao_asked {
                        ": see the targets' notes".to_string()
                    } else {
                        " (`[openbao] enabled = false`)".to_string()
                    }
                },
                |k| format!(": {k}"),
            );
        let _ = writeln!(s, "Not run{why}.\n");
        return;
    };
    if standalone {
        let m = &r.machine;
        let _ = writeln!(
            s,
            "Measured {} by `meshward-bench run --only openbao` (commit {}), apart from the \
             rest of this file.\n",
            o.date, m.commit
        );
    }
    describe(s, r, o);
    comparison_table(s, o, t.openbao_clients);
    detail_table(s, o);
    for row in &o.rows {
        if let Some(e) = &row.first_error {
            let _ = writeln!(
                s,
                "First error ({} at {} clients, {} recorded): `{e}`\n",
                row.cell.server.label(),
                row.cell.clients,
                recorded(row.cell.stored)
            );
        }
    }
}

fn describe(s: &mut String, r: &Results, o: &OpenbaoComparison) {
    let cores = r.machine.cores;
    let csrs = o.concurrencies(true).into_iter().max().unwrap_or(0);
    let bao = &o.bao_version;
    let _ = writeln!(
        s,
        "`{bao}`. What a user would run instead of meshward as the mesh's CA: OpenBao's PKI \
         secrets engine. The same {csrs} P-256 CSRs (each its own key and one \
         `spiffe://cluster.local/ns/bench-i/sa/sa-i` URI SAN, made before any clock starts; \
         client i always sends CSR i) go to three servers, started once for this part, each a \
         child process on 127.0.0.1 sharing the {cores} cores with the load generator:\n\n\
         - **meshward**: the release `meshward-signer` as in the rows above (P-256 built-in \
         CA, root + intermediate, the SQLite ledger on), `CreateCertificate` over gRPC \
         (HTTP/2, one TLS connection per client) with a service-account JWT, from the same \
         load generator (`load.rs`);\n\
         - **OpenBao dev**: `bao server -dev`, storage in memory — nothing reaches the disk;\n\
         - **OpenBao raft**: `bao server` with `storage \"raft\"` in a temp dir, initialised \
         and unsealed with one key share — OpenBao's supported on-disk storage (BoltDB under \
         the raft log, an fsync per commit; the `file` backend was removed in OpenBao 2.7.0).\n\n\
         Both OpenBao servers have an HTTPS listener (`tls_cert_file` / `tls_key_file`: a \
         P-256 certificate for 127.0.0.1 the bench makes), a root at `pki` and an `istioca` \
         intermediate at `pki_int`, both EC P-256 keys generated inside OpenBao (the chain \
         of meshward's built-in CA), and role `istio` on `pki_int`: `allowed_uri_sans = \
         spiffe://cluster.local/*`, `use_csr_sans`, `require_cn = false`, no DNS / IP / \
         localhost names, `ttl = max_ttl = 24h` (the signer's default), no lease. The load \
         token's only policy allows `pki_int/sign/*`. Each OpenBao client is a reqwest client \
         with one keep-alive HTTP/1.1 TLS connection (how meshward's own Vault backend talks \
         to Vault), opened and checked with one request before the clock, then \
         `POST /v1/pki_int/sign/istio` with `{{\"csr\": …}}` in a closed loop.\n"
    );
    let unrecorded = o.concurrencies(false);
    let unrecorded = if unrecorded.is_empty() {
        String::new()
    } else {
        format!(
            " The *nothing recorded* rows (at {} clients) have meshward's ledger off and \
             the role `no_store = true` (`istio-no-store`).",
            unrecorded
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let _ = writeln!(
        s,
        "**Measurement**, as for the rows above: per cell, fresh client connections, a {} \
         warm-up, then a {} window; certificates per second (wall clock), latency per request \
         as the client sees it, and the server's CPU (utime + stime from `/proc/<pid>/stat`: \
         every thread of its one process) over the window. {} interleaved round(s), each \
         running every cell in turn (per concurrency: meshward, OpenBao dev, OpenBao raft); a \
         figure is the median of its rounds, and *meshward ÷* is the median over the rounds \
         of meshward's certificates per server CPU-second divided by the OpenBao cell's of \
         the same round. Load average {} when this part started, {} when it ended.\n",
        humantime::format_duration(std::time::Duration::from_secs_f64(o.warmup_s)),
        humantime::format_duration(std::time::Duration::from_secs_f64(o.window_s)),
        o.rounds,
        o.loadavg_start,
        o.loadavg_end,
    );
    let _ = writeln!(
        s,
        "**Recorded issuance.** meshward records every certificate in its ledger before it \
         answers (SQLite, `synchronous=FULL`, group commits); OpenBao's counterpart is the \
         role's `no_store = false`, its default: every certificate is written to storage \
         under `certs/<serial>`. So the comparison and the target have both recording — each \
         server's default, and what an operator needs to list or revoke what was issued.{unrecorded}\n"
    );
    let _ = writeln!(
        s,
        "**Not equal between the two.** *Protocol*: gRPC + protobuf over HTTP/2 vs JSON over \
         HTTP/1.1 (PEM in, PEM leaf + chain out). *Authentication*: meshward checks a \
         Kubernetes service-account JWT on every request (ES256; its signature verified on a \
         client's first request, then found in the verified-token cache) and binds the CSR's \
         identity to the token's namespace and service account; OpenBao looks up a service \
         token and its ACL policy on every request and only matches the CSR's URI SAN against \
         the role's glob. *CSR checks*: meshward refuses anything but exactly one canonical \
         SPIFFE URI SAN (no DNS / IP / email / CN / CA:true) and enforces per-namespace \
         policy and rate limits (the rate limit is off here); OpenBao applies its role. *What \
         is recorded*: meshward's ledger row holds the certificate's SHA-256, serial, \
         identity, validity and caller, one row per certificate in a transaction shared with \
         the others waiting; OpenBao stores the whole certificate, on raft through a raft log \
         entry and BoltDB. *Logging*: meshward writes a JSON log line per issuance; OpenBao \
         has no audit device, its default (one would add a log entry per request). \
         *Runtime*: Rust (tokio, mimalloc) vs Go. The load generator's CPU (*loadgen cores*) \
         is in neither server's figures.\n"
    );
}

fn mib_of(bytes: Option<u64>) -> String {
    bytes.map_or("–".to_string(), |b| {
        format!("{:.0}", crate::signer_proc::Memory::mib(b))
    })
}

fn cell_row(o: &OpenbaoComparison, server: Server, stored: bool, clients: usize) -> Option<&Row> {
    o.row(Cell {
        server,
        stored,
        clients,
    })
}

fn per_cpu(row: Option<&Row>) -> String {
    row.map_or("–".to_string(), |r| {
        format!("{:.0}", r.certs_per_server_cpu_s)
    })
}

fn ratio(row: Option<&Row>) -> String {
    row.and_then(|r| r.meshward_ratio)
        .map_or("–".to_string(), |x| format!("{x:.2}×"))
}

fn comparison_table(s: &mut String, o: &OpenbaoComparison, target_clients: usize) {
    let _ = writeln!(
        s,
        "**Certificates per server CPU-second** (higher is better; the target is checked on \
         the {target_clients}-client row with every certificate recorded):\n"
    );
    let _ = writeln!(
        s,
        "| clients | recorded | meshward | OpenBao dev (in memory) | OpenBao raft (on disk) | meshward ÷ dev | meshward ÷ raft | certs/s: meshward / dev / raft |"
    );
    let _ = writeln!(s, "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for stored in [true, false] {
        for c in o.concurrencies(stored) {
            let m = cell_row(o, Server::Meshward, stored, c);
            let dev = cell_row(o, Server::OpenbaoDev, stored, c);
            let raft = cell_row(o, Server::OpenbaoRaft, stored, c);
            let rate =
                |r: Option<&Row>| r.map_or("–".to_string(), |r| format!("{:.0}", r.certs_per_s));
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
                recorded(stored),
                per_cpu(m),
                per_cpu(dev),
                per_cpu(raft),
                ratio(dev),
                ratio(raft),
                rate(m),
                rate(dev),
                rate(raft),
            );
        }
    }
    let _ = writeln!(s);
}

fn detail_table(s: &mut String, o: &OpenbaoComparison) {
    let _ = writeln!(
        s,
        "| server | recorded | clients | certs/s | p50 ms | p99 ms | server cores | loadgen cores | certs / server CPU-s | server CPU / cert | of which kernel | meshward ÷ this | each round: certs / server CPU-s | peak RSS MiB | errors |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
    );
    for stored in [true, false] {
        for c in o.concurrencies(stored) {
            for server in std::iter::once(Server::Meshward).chain(Server::OPENBAO) {
                let Some(row) = cell_row(o, server, stored, c) else {
                    continue;
                };
                let cpu_us = if row.certs_per_server_cpu_s > 0.0 {
                    format!("{:.0} µs", 1e6 / row.certs_per_server_cpu_s)
                } else {
                    "–".to_string()
                };
                let rounds = row
                    .samples
                    .iter()
                    .map(|x| format!("{:.0}", x.certs_per_server_cpu_s))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    s,
                    "| {} | {} | {c} | {:.0} | {} | {} | {:.2} | {:.2} | {:.0} | {cpu_us} | {:.0} µs | {} | {rounds} | {} | {} |",
                    server.label(),
                    recorded(stored),
                    row.certs_per_s,
                    ms(&row.latency_ms, |x| x.p50),
                    ms(&row.latency_ms, |x| x.p99),
                    row.server_cores,
                    row.loadgen_cores,
                    row.certs_per_server_cpu_s,
                    row.server_kernel_us_per_cert,
                    ratio(Some(row)),
                    mib_of(row.server_peak_rss),
                    row.errors,
                );
            }
        }
    }
    let _ = writeln!(s);
}
