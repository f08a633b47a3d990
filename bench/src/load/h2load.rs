//! The same child signer driven by h2load (nghttp2) instead of the Rust
//! clients: gRPC `CreateCertificate` over TLS (h2 by ALPN), the same
//! identities' tokens and CSRs, the same CPU readings around the window —
//! only the client program differs.
//!
//! - [`Identities::One`]: one h2load process, `-c N -m 1 -t 1`, every
//!   connection with workload 0's token and CSR;
//! - [`Identities::PerClient`]: N h2load processes, `-c 1 -m 1`, process i
//!   with workload i's token and CSR (the Rust load's identities).
//!
//! A gRPC refusal is HTTP 200 with `grpc-status` in the trailers, which
//! h2load counts as a success, so certificates are counted from the
//! signer's own `meshward_signer_requests_total{outcome="issued"}`, and a
//! window whose issued count differs from h2load's succeeded requests fails.
//!
//! h2load does not verify the server's certificate (it has no option to);
//! the signer's serving certificate is the one the Rust clients verify.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use meshward_proto::auth::IstioCertificateRequest;
use prost::Message;
use serde::Serialize;

use super::{Counted, Edge, Throughput};
use crate::envoy_authz::H2load;
use crate::signer_proc::{
    ChildSigner, process_cpu_time, requests_by_outcome, scrape_metrics, waited_children_cpu_times,
};
use crate::workload::Workload;

/// The gRPC method's path.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Whose tokens and CSRs the h2load connections send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Identities {
    /// One h2load process; every connection with the same token and CSR.
    #[value(name = "one-identity")]
    One,
    /// One h2load process per connection, each with its own identity's
    /// token and CSR (the Rust load's identities).
    #[value(name = "identities")]
    PerClient,
}

impl Identities {
    /// How the report names the load at `clients` connections.
    pub fn label(self, clients: usize) -> String {
        match self {
            Identities::One => "h2load, 1 identity".to_string(),
            Identities::PerClient => format!("h2load, {clients} identities"),
        }
    }
}

/// A gRPC message frame: a 0 compression flag, the length (u32, big
/// endian), the message.
pub fn grpc_frame(message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u32::try_from(message.len())
        .with_context(|| format!("a {}-byte gRPC message", message.len()))?;
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(out)
}

/// The request body of `CreateCertificate` for `csr_pem`, as the Rust
/// clients send it (validity 0: the CA's default; no metadata).
pub fn create_certificate_body(csr_pem: &str) -> anyhow::Result<Vec<u8>> {
    let request = IstioCertificateRequest {
        csr: csr_pem.to_string(),
        validity_duration: 0,
        metadata: None,
    };
    grpc_frame(&request.encode_to_vec())
}

/// What one h2load process reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    /// The summary (`requests:`, `status codes:`).
    pub summary: H2load,
    /// `requests: … N succeeded`: streams that ended with a 2xx or 3xx
    /// (a gRPC refusal among them).
    pub succeeded: u64,
}

impl Counts {
    /// Parses h2load's output.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let summary = H2load::parse(text)?;
        let succeeded = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("requests: "))
            .and_then(|rest| {
                rest.split(',').find_map(|part| {
                    part.trim()
                        .strip_suffix(" succeeded")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .context("h2load: no `succeeded` in `requests:`")?;
        Ok(Self { summary, succeeded })
    }
}

/// The signer's `CreateCertificate` outcomes counted in a span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes {
    /// `issued`.
    pub issued: u64,
    /// Every other outcome that moved, with how often.
    pub refused: Vec<(String, u64)>,
}

impl Outcomes {
    /// What moved between two readings of `requests_by_outcome`.
    pub fn between(before: &[(String, f64)], after: &[(String, f64)]) -> Self {
        let mut out = Self::default();
        for (outcome, v1) in after {
            let v0 = before
                .iter()
                .find(|(o, _)| o == outcome)
                .map_or(0.0, |(_, v)| *v);
            let moved = (v1 - v0).max(0.0).round() as u64;
            if outcome == "issued" {
                out.issued = moved;
            } else if moved > 0 {
                out.refused.push((outcome.clone(), moved));
            }
        }
        out
    }
}

/// Why h2load's figures cannot be taken as issued certificates.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    /// Not every request h2load was to send succeeded at the HTTP level.
    #[error(
        "h2load was to send {sent} requests and {succeeded} succeeded ({failed} failed, \
         {errored} errored, {timeout} timed out, {non_2xx} non-2xx)"
    )]
    Unsent {
        sent: u64,
        succeeded: u64,
        failed: u64,
        errored: u64,
        timeout: u64,
        non_2xx: u64,
    },
    /// The signer refused some of them (HTTP 200, `grpc-status` ≠ 0).
    #[error("the signer refused requests in the window: {0:?}")]
    Refused(Vec<(String, u64)>),
    /// The signer issued a different number of certificates.
    #[error("h2load counted {succeeded} succeeded requests, the signer {issued} issued")]
    Count { succeeded: u64, issued: u64 },
}

/// The certificates of a window: every one of the `sent` requests h2load
/// was to send succeeded, the signer refused none, and it issued exactly as
/// many as h2load counted.
pub fn check_issuance(sent: u64, counts: &[Counts], signer: &Outcomes) -> Result<u64, Mismatch> {
    let sum = |f: fn(&Counts) -> u64| counts.iter().map(f).sum::<u64>();
    let succeeded = sum(|c| c.succeeded);
    let (failed, errored, timeout, non_2xx) = (
        sum(|c| c.summary.failed),
        sum(|c| c.summary.errored),
        sum(|c| c.summary.timeout),
        sum(|c| c.summary.status_other),
    );
    if succeeded != sent || failed + errored + timeout + non_2xx > 0 {
        return Err(Mismatch::Unsent {
            sent,
            succeeded,
            failed,
            errored,
            timeout,
            non_2xx,
        });
    }
    if !signer.refused.is_empty() {
        return Err(Mismatch::Refused(signer.refused.clone()));
    }
    if signer.issued != succeeded {
        return Err(Mismatch::Count {
            succeeded,
            issued: signer.issued,
        });
    }
    Ok(signer.issued)
}

/// Requests for each of `connections` (in order) so that together they send
/// about `total`, in proportion to their connections, at least one per
/// connection.
pub fn split_requests(total: u64, connections: &[usize]) -> Vec<u64> {
    let all = connections.iter().sum::<usize>().max(1) as f64;
    connections
        .iter()
        .map(|&c| ((total as f64 * c as f64 / all).ceil() as u64).max(c as u64))
        .collect()
}

/// `h2load --version`'s first line; an error when h2load cannot run.
pub fn version(binary: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "running {} (Debian's nghttp2-client; set [envoy] h2load)",
                binary.display()
            )
        })?;
    anyhow::ensure!(
        out.status.success(),
        "{} --version: {}",
        binary.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// One h2load process: its connections, token and body file.
struct Process {
    connections: usize,
    token: String,
    body: PathBuf,
}

/// How much an h2load run sends.
enum Amount {
    /// `-D`: for this long (the warm-up).
    For(Duration),
    /// `-n`: this many requests.
    Requests(u64),
}

/// Run every process at once and wait for all of them; their counts in
/// order.
async fn run_all(
    binary: &Path,
    url: &str,
    processes: &[Process],
    amounts: &[Amount],
    deadline: Duration,
) -> anyhow::Result<Vec<Counts>> {
    let mut children = Vec::with_capacity(processes.len());
    for (p, amount) in processes.iter().zip(amounts) {
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(["-c", &p.connections.to_string(), "-m", "1", "-t", "1"]);
        match amount {
            Amount::For(d) => cmd.args(["-D", &format!("{}ms", d.as_millis().max(1))]),
            Amount::Requests(n) => cmd.args(["-n", &n.to_string()]),
        };
        cmd.arg("-d")
            .arg(&p.body)
            .args(["-H", "content-type: application/grpc"])
            .args(["-H", "te: trailers"])
            .arg("-H")
            .arg(format!("authorization: Bearer {}", p.token))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        children.push(
            cmd.spawn()
                .with_context(|| format!("starting {}", binary.display()))?,
        );
    }
    let outputs = tokio::time::timeout(deadline, async {
        let mut outputs = Vec::with_capacity(children.len());
        for child in children {
            outputs.push(child.wait_with_output().await);
        }
        outputs
    })
    .await
    .with_context(|| format!("h2load did not finish within {deadline:?}"))?;
    let mut counts = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.into_iter().enumerate() {
        let out = out.with_context(|| format!("waiting for h2load process {i}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = Counts::parse(&text).with_context(|| {
            format!(
                "h2load process {i} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        counts.push(parsed);
    }
    Ok(counts)
}

/// The signer's outcomes so far.
async fn outcomes_now(signer: &ChildSigner) -> anyhow::Result<Vec<(String, f64)>> {
    let admin = signer
        .admin_addr
        .context("the signer reported no admin address: its issuance cannot be counted")?;
    let text = scrape_metrics(admin, Duration::from_secs(5)).await?;
    let outcomes = requests_by_outcome(&text);
    anyhow::ensure!(
        outcomes.iter().any(|(o, _)| o == "issued"),
        "no meshward_signer_requests_total{{outcome=\"issued\"}} in the signer's /metrics"
    );
    Ok(outcomes)
}

/// The load generator's CPU so far: this process and the h2load processes
/// it has reaped.
fn loadgen_cpu() -> anyhow::Result<Duration> {
    Ok(
        process_cpu_time("/proc/self/stat")?
            + waited_children_cpu_times("/proc/self/stat")?.total(),
    )
}

/// `connections` h2load connections in closed loops (`-m 1`) against
/// `signer`: a `warmup` run (`-D`), whose rate sizes the measured run
/// (`-n`) to about `window`; the signer's CPU is read just before the
/// measured processes start and just after the last one exits, and the
/// certificates are the signer's own issued count over that span, checked
/// against h2load's.
pub async fn throughput(
    signer: &ChildSigner,
    workloads: &[Workload],
    identities: Identities,
    connections: usize,
    warmup: Duration,
    window: Duration,
    binary: &Path,
) -> anyhow::Result<Throughput> {
    anyhow::ensure!(connections > 0, "0 h2load connections");
    let per_process = match identities {
        Identities::One => vec![connections],
        Identities::PerClient => vec![1; connections],
    };
    anyhow::ensure!(
        workloads.len() >= per_process.len(),
        "{} workloads prepared for {} h2load processes",
        workloads.len(),
        per_process.len()
    );
    let dir = tempfile::Builder::new()
        .prefix("h2load-")
        .tempdir()
        .context("a temp dir for the h2load request bodies")?;
    let mut processes = Vec::with_capacity(per_process.len());
    for (i, (&c, w)) in per_process.iter().zip(workloads).enumerate() {
        let body = dir.path().join(format!("create-certificate-{i}.bin"));
        std::fs::write(&body, create_certificate_body(&w.csr_pem)?)
            .with_context(|| format!("writing {}", body.display()))?;
        processes.push(Process {
            connections: c,
            token: w.token(&signer.tokens)?,
            body,
        });
    }
    let url = format!("https://{}{CREATE_CERTIFICATE_PATH}", signer.grpc_addr);
    let deadline = (warmup + window) * 10 + Duration::from_secs(60);

    // Warm-up: connections, the token cache, the ledger. It must issue, and
    // the signer must refuse nothing (h2load cannot tell).
    let before = outcomes_now(signer).await?;
    let warm_amounts: Vec<Amount> = processes.iter().map(|_| Amount::For(warmup)).collect();
    let warm = run_all(binary, &url, &processes, &warm_amounts, deadline).await?;
    // Requests in flight when a `-D` run stops may still be answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let warm_outcomes = Outcomes::between(&before, &outcomes_now(signer).await?);
    let warm_succeeded: u64 = warm.iter().map(|c| c.succeeded).sum();
    anyhow::ensure!(
        warm_outcomes.refused.is_empty() && warm_outcomes.issued >= warm_succeeded.max(1),
        "h2load warm-up: {warm_succeeded} requests succeeded, the signer issued {} and refused {:?}",
        warm_outcomes.issued,
        warm_outcomes.refused
    );
    let rate: f64 = warm.iter().map(|c| c.summary.requests_per_s).sum();
    let amounts = split_requests(
        (rate * window.as_secs_f64()).ceil() as u64,
        &processes.iter().map(|p| p.connections).collect::<Vec<_>>(),
    );
    let sent = amounts.iter().sum::<u64>();

    let before = outcomes_now(signer).await?;
    let edge0 = Edge::start(signer, loadgen_cpu()?).await?;
    let counts = run_all(
        binary,
        &url,
        &processes,
        &amounts
            .iter()
            .map(|&n| Amount::Requests(n))
            .collect::<Vec<_>>(),
        deadline,
    )
    .await?;
    let edge1 = Edge::end(signer, loadgen_cpu()?).await?;
    let signer_outcomes = Outcomes::between(&before, &outcomes_now(signer).await?);
    let issued = check_issuance(sent, &counts, &signer_outcomes).with_context(|| {
        format!(
            "{} at {connections} connections",
            identities.label(connections)
        )
    })?;
    Ok(Throughput::of(
        signer,
        connections,
        Counted {
            issued,
            window_s: None,
            ..Counted::default()
        },
        &edge0,
        &edge1,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "starting benchmark...
spawning thread #0: 64 total client(s). 25000 total requests
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2

finished in 4.01s, 6234.41 req/s, 9.87MB/s
requests: 25000 total, 25000 started, 25000 done, 24990 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 24990 2xx, 0 3xx, 0 4xx, 10 5xx
traffic: 39.58MB (41502311) total, 1.29MB (1350000) headers (space savings 40.10%), 38.04MB (39890000) data
";

    fn counts(succeeded: u64, failed: u64) -> Counts {
        Counts {
            summary: H2load {
                total: succeeded + failed,
                done: succeeded + failed,
                failed,
                status_2xx: succeeded,
                status_other: failed,
                ..H2load::default()
            },
            succeeded,
        }
    }

    #[test]
    fn request_body_is_a_grpc_frame_of_the_protobuf_request() {
        let body = create_certificate_body("-----BEGIN CERTIFICATE REQUEST-----").unwrap();
        assert_eq!(body[0], 0, "uncompressed");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(len, body.len() - 5);
        let request = IstioCertificateRequest::decode(&body[5..]).unwrap();
        assert_eq!(request.csr, "-----BEGIN CERTIFICATE REQUEST-----");
        assert_eq!(request.validity_duration, 0);
        assert!(request.metadata.is_none());
        assert_eq!(grpc_frame(&[]).unwrap(), vec![0, 0, 0, 0, 0]);
        assert_eq!(grpc_frame(&[7; 300]).unwrap()[..5], [0, 0, 0, 1, 44]);
    }

    #[test]
    fn succeeded_and_failed_requests_are_read_from_h2load_output() {
        let c = Counts::parse(OUTPUT).unwrap();
        assert_eq!(c.succeeded, 24990);
        assert_eq!((c.summary.total, c.summary.failed), (25000, 10));
        assert_eq!((c.summary.status_2xx, c.summary.status_other), (24990, 10));
        assert_eq!(c.summary.requests_per_s, 6234.41);
        let without = OUTPUT.replace(" 24990 succeeded,", "");
        assert!(Counts::parse(&without).is_err());
        assert!(Counts::parse("connect to 127.0.0.1 failed").is_err());
    }

    #[test]
    fn signer_outcomes_are_what_moved_between_two_scrapes() {
        let s = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
            v.iter().map(|(o, n)| (o.to_string(), *n)).collect()
        };
        let before = s(&[("issued", 100.0), ("unauthenticated", 2.0)]);
        let after = s(&[
            ("issued", 4196.0),
            ("unauthenticated", 2.0),
            ("invalid_argument", 5.0),
        ]);
        assert_eq!(
            Outcomes::between(&before, &after),
            Outcomes {
                issued: 4096,
                refused: vec![("invalid_argument".to_string(), 5)]
            }
        );
    }

    #[test]
    fn issued_must_equal_h2load_succeeded() {
        let ok = Outcomes {
            issued: 3000,
            refused: Vec::new(),
        };
        let c = [counts(1000, 0), counts(2000, 0)];
        assert_eq!(check_issuance(3000, &c, &ok), Ok(3000));
        // The signer issued fewer than h2load saw succeed.
        let fewer = Outcomes {
            issued: 2990,
            ..ok.clone()
        };
        assert_eq!(
            check_issuance(3000, &c, &fewer),
            Err(Mismatch::Count {
                succeeded: 3000,
                issued: 2990
            })
        );
    }

    #[test]
    fn grpc_refusals_behind_http_200_fail_the_window() {
        // Every request 200 to h2load, but the signer refused ten.
        let refused = Outcomes {
            issued: 2990,
            refused: vec![("unauthenticated".to_string(), 10)],
        };
        assert!(matches!(
            check_issuance(3000, &[counts(3000, 0)], &refused),
            Err(Mismatch::Refused(_))
        ));
    }

    #[test]
    fn requests_h2load_did_not_complete_fail_the_window() {
        let ok = Outcomes {
            issued: 2990,
            refused: Vec::new(),
        };
        assert!(matches!(
            check_issuance(3000, &[counts(2990, 10)], &ok),
            Err(Mismatch::Unsent { failed: 10, .. })
        ));
        assert!(matches!(
            check_issuance(3000, &[counts(2990, 0)], &ok),
            Err(Mismatch::Unsent { .. })
        ));
    }

    #[test]
    fn requests_are_split_by_connections_at_least_one_each() {
        assert_eq!(split_requests(25_000, &[64]), vec![25_000]);
        assert_eq!(split_requests(10, &[64]), vec![64]);
        assert_eq!(split_requests(6400, &[1; 64]), vec![100; 64]);
        assert_eq!(split_requests(6401, &[1; 64]), vec![101; 64]);
        assert_eq!(split_requests(0, &[1, 1]), vec![1, 1]);
    }

    #[test]
    fn loads_are_named_for_the_report() {
        assert_eq!(Identities::One.label(64), "h2load, 1 identity");
        assert_eq!(Identities::PerClient.label(64), "h2load, 64 identities");
    }
}
