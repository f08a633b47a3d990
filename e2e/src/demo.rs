//! The demo on real Envoy: a signer, three workloads in two namespaces, each
//! behind its own Envoy sidecar (certificates over the Istio CA API, handed
//! to Envoy over file-based SDS), the filter on shop/backend's sidecar as
//! the repo's HTTP WasmPlugin, real requests, a certificate rotation Envoy
//! picks up without a restart, and the filter's metrics as Envoy exports
//! them.
//!
//! Every figure in the table is read back from Envoy: the status and
//! `x-meshward-deny-reason` from its response, the action and rule from the
//! filter's decision counter in the backend's `/stats`, the certificate
//! from the backend's XFCC header (the request reached the app) or the
//! caller's `/certs` (it did not).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::envoy::bootstrap::InboundApp;
use crate::envoy::client;
use crate::envoy::envoy_binary;
use crate::envoy::istio_stats::{self, ProxyStatsConfig, StatsTemplate};
use crate::envoy::sidecar::{EnvoyMesh, EnvoySidecar, SidecarSpec};
use crate::envoy::wasmplugin::WasmPlugin;
use crate::mesh::backend::spawn_echo;
use crate::mesh::{CertInfo, LocalSigner, MeshResponse};

/// Demo settings (`--config demo.toml`); every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Certificate lifetime of the workload that shows a rotation.
    #[serde(with = "humantime_secs")]
    pub rotation_ttl: Duration,
    /// The backend's HTTP filter `pluginConfig`; default: [`demo_policy`].
    pub policy: Option<Value>,
    /// The filter `.wasm`; default: `MESHWARD_FILTER_WASM` or `target/meshward_filter.wasm`.
    pub wasm: Option<PathBuf>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            rotation_ttl: Duration::from_secs(8),
            policy: None,
            wasm: None,
        }
    }
}

mod humantime_secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// The policy on shop/backend: frontend may `GET /api/*` with a certificate
/// younger than 12 h; reporter is denied outright.
pub fn demo_policy() -> Value {
    json!({
        "trustDomain": "cluster.local",
        "mode": "enforce",
        "rules": [
            {"name": "frontend-reads-api", "action": "ALLOW",
             "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
             "to": [{"methods": ["GET"], "paths": ["/api/*"]}],
             "when": {"maxCertAge": "12h"}},
            {"name": "deny-reporter", "action": "DENY",
             "from": [{"principals": ["cluster.local/ns/batch/sa/reporter"]}]}
        ]
    })
}

/// The WasmPlugin manifest the demo's policy goes into.
const MANIFEST: &str = "wasmplugin-http.yaml";
/// The host callers address the backend by.
const BACKEND_HOST: &str = "backend.shop";
/// The filter's counter of decisions (tags `action`, `rule`, `mode`).
const DECISIONS: &str = "meshward_decisions_total";
/// The filter's histogram of peer certificate ages.
const CERT_AGE_COUNT: &str = "meshward_peer_cert_age_seconds_count";
/// Envoy's namespace for the stats a wasm plugin defines.
const PLUGIN_STAT_PREFIX: &str = "wasmcustom.";
/// How long Envoy may take to load a rotated SDS secret.
const SDS_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy merges histograms when it flushes stats (every 5 s by default).
const HISTOGRAM_FLUSH_TIMEOUT: Duration = Duration::from_secs(12);

/// A plugin stat's name as Envoy's `/stats` lists it
/// (`wasmcustom.action=.=allow;.;rule=.=r1;.;mode=.=enforce;.;meshward_decisions_total`):
/// its family and tags; `None` for Envoy's own stats.
pub fn parse_plugin_stat(name: &str) -> Option<(&str, Vec<(&str, &str)>)> {
    let mut rest = name.strip_prefix(PLUGIN_STAT_PREFIX)?;
    let mut tags = Vec::new();
    while let Some((segment, tail)) = rest.split_once(";.;") {
        tags.push(segment.split_once("=.=")?);
        rest = tail;
    }
    Some((rest, tags))
}

/// The counters of `/stats` that the plugin defined, by full name.
fn plugin_counters(stats: Vec<(String, String)>) -> BTreeMap<String, u64> {
    stats
        .into_iter()
        .filter(|(name, _)| name.starts_with(PLUGIN_STAT_PREFIX))
        .filter_map(|(name, value)| Some((name, value.trim().parse().ok()?)))
        .collect()
}

/// The verdict the filter counted for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// `allow` or `deny`.
    pub action: String,
    /// The rule, or `_<reason>` when none matched.
    pub rule: String,
}

/// The decision counter that moved between two `/stats` snapshots (AUDIT
/// marks aside).
pub fn decision_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Option<Counted> {
    after.iter().find_map(|(name, value)| {
        if *value <= before.get(name).copied().unwrap_or(0) {
            return None;
        }
        let (family, tags) = parse_plugin_stat(name)?;
        let tag = |k: &str| tags.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        let action = tag("action")?;
        (family == DECISIONS && action != "audit").then(|| Counted {
            action: action.to_owned(),
            rule: tag("rule").unwrap_or("").to_owned(),
        })
    })
}

/// The `Hash=` (SHA-256 of the client certificate, hex) of the first
/// element of an `x-forwarded-client-cert` value.
pub fn xfcc_hash(xfcc: &str) -> Option<&str> {
    let element = xfcc.split(',').next()?;
    element
        .split(';')
        .find_map(|pair| pair.trim().strip_prefix("Hash="))
        .map(|h| h.trim_matches('"'))
}

/// A certificate serial number as hex, lower case, without separators or
/// leading zeros (how Envoy's `/certs` and the DER compare).
fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_owned()
}

/// The serial numbers of the certificates carrying URI SAN `spiffe_id` in
/// Envoy's `/certs` answer (one per TLS context using the secret).
pub fn envoy_cert_serials(certs: &Value, spiffe_id: &str) -> Vec<String> {
    let mut serials: Vec<String> = field(certs, "certificates")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| field(c, "cert_chain").as_array())
        .flatten()
        .filter(|cert| {
            field(cert, "subject_alt_names")
                .as_array()
                .into_iter()
                .flatten()
                .any(|san| field(san, "uri") == spiffe_id)
        })
        .filter_map(|cert| field(cert, "serial_number").as_str())
        .map(normalize_serial)
        .collect();
    serials.sort();
    serials.dedup();
    serials
}

/// `v.key`, `null` when `v` is no object or has no `key`.
fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    v.get(key).unwrap_or(&NULL)
}

fn serial_of(cert: &CertInfo) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) = X509Certificate::from_der(&cert.leaf).ok()?;
    Some(normalize_serial(&hex::encode(x509.raw_serial())))
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The Prometheus lines of the filter's own families (`meshward_*`), the
/// `# TYPE` lines with them.
pub fn filter_prometheus(text: &str) -> String {
    text.lines()
        .filter(|l| {
            l.strip_prefix("# TYPE ")
                .unwrap_or(l)
                .starts_with("meshward_")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The value of the unlabelled series `name` in Prometheus text.
fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        // Envoy writes an untagged series as `name{} value`.
        let value = rest.strip_prefix("{}").unwrap_or(rest).strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A short account of a `pluginConfig`'s rules (mode, then per rule: name,
/// action, from, to, when).
pub fn describe_policy(policy: &Value) -> String {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let rules: Vec<String> = field(policy, "rules")
        .as_array()
        .into_iter()
        .flatten()
        .map(|rule| {
            let mut text = format!(
                "{} {}",
                field(rule, "action").as_str().unwrap_or("?"),
                field(rule, "name").as_str().unwrap_or("?")
            );
            let mut from = Vec::new();
            for source in field(rule, "from").as_array().into_iter().flatten() {
                from.extend(strings(field(source, "principals")));
                from.extend(
                    strings(field(source, "namespaces"))
                        .into_iter()
                        .map(|ns| format!("ns/{ns}")),
                );
            }
            if !from.is_empty() {
                let _ = write!(text, " from {}", from.join(", "));
            }
            for op in field(rule, "to").as_array().into_iter().flatten() {
                let parts = [strings(field(op, "methods")), strings(field(op, "paths"))].concat();
                if !parts.is_empty() {
                    let _ = write!(text, " {}", parts.join(" "));
                }
            }
            if let Some(when) = field(rule, "when").as_object() {
                let conditions: Vec<String> = when
                    .iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or(&v.to_string())))
                    .collect();
                let _ = write!(text, " when {}", conditions.join(", "));
            }
            text
        })
        .collect();
    format!(
        "mode {}; {}",
        field(policy, "mode").as_str().unwrap_or("enforce"),
        rules.join("; ")
    )
}

fn secs(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A caller: its Envoy sidecar and every certificate its agent has
/// written so far (to tell which one Envoy presented).
struct Caller {
    sidecar: EnvoySidecar,
    certs: RefCell<Vec<CertInfo>>,
}

impl Caller {
    async fn start(
        mut spec: SidecarSpec,
        backend: &EnvoySidecar,
        mesh: &EnvoyMesh,
    ) -> anyhow::Result<Self> {
        let mut upstream = backend.as_upstream(BACKEND_HOST)?;
        // Every request its own mTLS handshake, with the certificate Envoy
        // holds at that moment (no pooled connection from before a rotation).
        upstream.handshake_per_request = true;
        spec.upstreams.push(upstream);
        let sidecar = EnvoySidecar::start(spec, mesh).await?;
        let caller = Self {
            sidecar,
            certs: RefCell::new(Vec::new()),
        };
        caller.note_cert();
        Ok(caller)
    }

    fn note_cert(&self) {
        let mut certs = self.certs.borrow_mut();
        if let Some(c) = self.sidecar.cert()
            && !certs.iter().any(|k| k.generation == c.generation)
        {
            certs.push(c);
        }
    }

    /// The certificate whose SHA-256 is `hash`.
    fn cert_by_hash(&self, hash: &str) -> Option<CertInfo> {
        self.certs
            .borrow()
            .iter()
            .find(|c| sha256_hex(&c.leaf).eq_ignore_ascii_case(hash))
            .cloned()
    }

    /// The certificate Envoy holds now, per its `/certs`.
    async fn held_by_envoy(&self) -> anyhow::Result<Option<CertInfo>> {
        let (status, body) = self.sidecar.admin().get("/certs").await?;
        anyhow::ensure!(status == 200, "/certs answered {status}: {body}");
        let certs: Value = serde_json::from_str(&body).context("/certs")?;
        let serials = envoy_cert_serials(&certs, &self.sidecar.identity());
        Ok(self
            .certs
            .borrow()
            .iter()
            .find(|c| serial_of(c).is_some_and(|s| serials.contains(&s)))
            .cloned())
    }

    /// The certificate presented for `response`: what the backend's Envoy
    /// put in XFCC when the request reached the app, else what the caller's
    /// Envoy holds.
    async fn presented(&self, response: &MeshResponse) -> anyhow::Result<Option<CertInfo>> {
        let echoed: Option<Value> = serde_json::from_slice(&response.body).ok();
        let hash = echoed
            .as_ref()
            .and_then(|e| field(field(e, "headers"), "x-forwarded-client-cert").as_str())
            .and_then(xfcc_hash)
            .map(str::to_owned);
        match hash {
            Some(hash) => Ok(self.cert_by_hash(&hash)),
            None => self.held_by_envoy().await,
        }
    }

    /// Waits until Envoy holds the certificate of `generation`.
    async fn wait_until_envoy_holds(&self, generation: u64) -> anyhow::Result<Duration> {
        let start = tokio::time::Instant::now();
        loop {
            if self
                .held_by_envoy()
                .await?
                .is_some_and(|c| c.generation == generation)
            {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < SDS_RELOAD_TIMEOUT,
                "Envoy of {} did not load certificate generation {generation} from SDS within {SDS_RELOAD_TIMEOUT:?}:\n{}",
                self.sidecar.identity(),
                log_tail(&self.sidecar.log(), 20)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all.get(all.len().saturating_sub(lines)..)
        .unwrap_or_default()
        .join("\n")
}

struct Table {
    out: String,
    requests: u64,
}

impl Table {
    fn new() -> Self {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<34} {:<20} {:<9} {:<22} {:>3} {:>8} {:>9}  x-meshward-deny-reason",
            "caller (SPIFFE ID)", "request", "decision", "rule", "gen", "cert age", "remaining",
        );
        let _ = writeln!(out, "{}", "-".repeat(142));
        Self { out, requests: 0 }
    }

    fn row(
        &mut self,
        caller: &str,
        request: &str,
        r: &MeshResponse,
        counted: Option<Counted>,
        cert: Option<&CertInfo>,
    ) {
        let now = SystemTime::now();
        let (generation, age, remaining) = cert.map_or(("?".into(), "?".into(), "?".into()), |c| {
            (
                c.generation.to_string(),
                secs(c.age(now)),
                secs(c.remaining(now)),
            )
        });
        let Counted { action, rule } = counted.unwrap_or_else(|| Counted {
            action: "?".into(),
            rule: "?".into(),
        });
        let _ = writeln!(
            self.out,
            "{:<34} {:<20} {:<9} {:<22} {:>3} {:>8} {:>9}  {}",
            caller.trim_start_matches("spiffe://"),
            request,
            format!("{action} {}", r.status),
            rule,
            generation,
            age,
            remaining,
            r.header("x-meshward-deny-reason").unwrap_or("-")
        );
        self.requests += 1;
    }

    fn note(&mut self, text: &str) {
        let _ = writeln!(self.out, "  {text}");
    }
}

/// One request from `from`'s app through its sidecar to the backend; one row.
async fn call(
    table: &mut Table,
    backend: &EnvoySidecar,
    from: &Caller,
    method: &str,
    path: &str,
) -> anyhow::Result<u16> {
    from.note_cert();
    let before = plugin_counters(backend.admin().stats().await?);
    let r = client::http(
        from.sidecar.outbound_addr(),
        BACKEND_HOST,
        method,
        path,
        &[],
    )
    .await
    .with_context(|| format!("{} {method} {path}", from.sidecar.identity()))?;
    let after = plugin_counters(backend.admin().stats().await?);
    from.note_cert();
    let cert = from.presented(&r).await?;
    table.row(
        &from.sidecar.identity(),
        &format!("{method} {path}"),
        &r,
        decision_between(&before, &after),
        cert.as_ref(),
    );
    Ok(r.status)
}

/// `envoy --version`, the part after `version: `.
async fn envoy_version(binary: &Path) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("running {} --version", binary.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} --version: {}",
        binary.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    Ok(text
        .rsplit_once("version: ")
        .map_or(text, |(_, v)| v)
        .to_owned())
}

/// Waits until Envoy's `/stats/prometheus` shows `requests` peer
/// certificates in the filter's histogram (histograms move when Envoy
/// flushes), then returns the filter's lines.
async fn filter_metrics(backend: &EnvoySidecar, requests: u64) -> anyhow::Result<String> {
    let start = tokio::time::Instant::now();
    loop {
        let text = backend.admin().prometheus().await?;
        let seen = prometheus_value(&text, CERT_AGE_COUNT).unwrap_or(0.0);
        let done = seen >= requests as f64;
        if done || start.elapsed() > HISTOGRAM_FLUSH_TIMEOUT {
            return Ok(filter_prometheus(&text));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the demo and returns what it prints.
pub async fn run(config: DemoConfig) -> anyhow::Result<String> {
    let (wasm_path, wasm) = match &config.wasm {
        Some(p) => (
            p.clone(),
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => (
            crate::wasm::filter_wasm_path(),
            crate::wasm::read_filter_wasm()?,
        ),
    };
    let wasm_path = std::path::absolute(&wasm_path)?;
    let policy = config.policy.clone().unwrap_or_else(demo_policy);
    let envoy = envoy_binary()?;
    let mut out = String::new();
    let dir = tempfile::tempdir()?;
    let signer = LocalSigner::start(&dir.path().join("ca"), Duration::from_secs(24 * 3600)).await?;
    let _ = writeln!(
        out,
        "signer: built-in CA in a temporary data dir, Istio CA API on {} (gRPC/TLS), admin on {}",
        signer.grpc_addr()?,
        signer.admin_addr()?
    );
    let _ = writeln!(
        out,
        "envoy: {} (official release build), one Envoy process per sidecar",
        envoy_version(&envoy).await?
    );
    let mesh = EnvoyMesh {
        signer_grpc: signer.grpc_addr()?,
        signer_admin: signer.admin_addr()?,
        roots_pem: signer.roots_pem()?,
        tokens: signer.tokens(),
        filter_wasm: wasm_path,
        dir: dir.path().join("sidecars"),
    };
    let plugin = WasmPlugin::manifest(MANIFEST)?.with_plugin_config(policy.clone());
    let _ = writeln!(
        out,
        "filter: meshward_filter.wasm ({} KiB) in Envoy's V8 runtime on shop/backend's inbound \
         listener, from istio-manifests/wasmplugin/{MANIFEST} ({}, pluginConfig = the demo policy)",
        wasm.len() / 1024,
        plugin.resource_name()
    );

    let (app, _app_task) = spawn_echo("backend").await?;
    let mut spec = SidecarSpec::new("shop", "backend");
    spec.inbound = Some(InboundApp::Http(app));
    spec.plugins = vec![plugin];
    // What an Istio sidecar keeps and tags, with the mesh's extraStatTags
    // (istio-manifests/istio/istio-operator.yaml).
    spec.stats_config = Some(istio_stats::stats_config(
        &StatsTemplate::istio()?,
        &ProxyStatsConfig::from_mesh_manifests()?,
        &["127.0.0.1"],
    ));
    let backend = EnvoySidecar::start(spec, &mesh).await?;
    let (frontend, reporter) = tokio::try_join!(
        Caller::start(SidecarSpec::new("shop", "frontend"), &backend, &mesh),
        Caller::start(SidecarSpec::new("batch", "reporter"), &backend, &mesh),
    )?;
    let _ = writeln!(
        out,
        "workloads: {}, {}, {} (each sidecar's agent got its certificate over gRPC with the \
         service-account token and hands it to Envoy over file-based SDS)",
        frontend.sidecar.identity(),
        backend.identity(),
        reporter.sidecar.identity()
    );
    let _ = writeln!(out, "policy: {}\n", describe_policy(&policy));

    let mut table = Table::new();
    for (from, method, path) in [
        (&frontend, "GET", "/api/orders"),
        (&frontend, "GET", "/api/orders/42"),
        (&frontend, "POST", "/api/orders"),
        (&frontend, "GET", "/admin"),
        (&reporter, "GET", "/api/orders"),
        (&reporter, "GET", "/healthz"),
    ] {
        call(&mut table, &backend, from, method, path).await?;
    }

    // Rotation: a frontend replica with short-lived certificates.
    let mut spec = SidecarSpec::new("shop", "frontend");
    spec.workload.cert_ttl = config.rotation_ttl;
    let mut rotating = Caller::start(spec, &backend, &mesh).await?;
    let pid = rotating.sidecar.envoy().pid();
    table.note(&format!(
        "shop/frontend replica with {} certificates, rotated by its agent at 50-80% of their lifetime:",
        humantime::format_duration(config.rotation_ttl)
    ));
    call(&mut table, &backend, &rotating, "GET", "/api/orders").await?;
    let first = rotating.sidecar.cert().context("no certificate")?;
    // Halfway to the earliest rotation (at 50 % of the lifetime).
    let lifetime = first
        .not_after
        .duration_since(first.not_before)
        .unwrap_or_default();
    let before_rotation = (first.not_before + lifetime.mul_f64(0.4))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(before_rotation).await;
    call(&mut table, &backend, &rotating, "GET", "/api/orders").await?;
    let rotated = rotating
        .sidecar
        .agent()
        .wait_for_rotation(first.generation, config.rotation_ttl * 2)
        .await?;
    let old_left = first.remaining(SystemTime::now());
    rotating.note_cert();
    let loaded_in = rotating.wait_until_envoy_holds(rotated.generation).await?;
    let envoy = rotating.sidecar.envoy();
    anyhow::ensure!(
        envoy.is_running() && envoy.pid() == pid,
        "the rotating replica's Envoy restarted"
    );
    table.note(&format!(
        "rotated: the agent wrote a new key and certificate (generation {}) to SDS, the old one had {} left;",
        rotated.generation,
        secs(old_left)
    ));
    table.note(&format!(
        "  Envoy (pid {}, not restarted) had loaded it from SDS within {:.1} ms; the next handshakes present it:",
        pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
        loaded_in.as_secs_f64() * 1000.0
    ));
    call(&mut table, &backend, &rotating, "GET", "/api/orders").await?;
    call(&mut table, &backend, &rotating, "GET", "/api/orders/42").await?;

    out.push_str(&table.out);
    let _ = writeln!(
        out,
        "\nfilter metrics on shop/backend, from its Envoy's /stats/prometheus (Istio's bootstrap \
         stats_config, the mesh's extraStatTags as labels):\n"
    );
    out.push_str(&filter_metrics(&backend, table.requests).await?);
    drop(rotating);
    drop((frontend, reporter, backend));
    let mut signer = signer;
    signer.stop().await?;
    Ok(out)
}

/// Start and end markers of the demo output in the README.
pub const README_MARKERS: (&str, &str) = ("<!-- demo-output:start -->", "<!-- demo-output:end -->");

/// Replaces what lies between the [`README_MARKERS`] in `readme` with
/// `output` as a code block.
pub fn splice_readme(readme: &str, output: &str) -> anyhow::Result<String> {
    let (start, end) = README_MARKERS;
    let a = readme
        .find(start)
        .context("README has no demo-output start marker")?;
    let b = readme
        .find(end)
        .context("README has no demo-output end marker")?;
    anyhow::ensure!(a < b, "README demo-output markers are out of order");
    let head = readme.get(..a + start.len()).context("marker")?;
    let tail = readme.get(b..).context("marker")?;
    Ok(format!(
        "{head}\n```text\n{}\n```\n{tail}",
        output.trim_end()
    ))
}

/// Loads a demo config file (TOML).
pub fn load_config(path: Option<&Path>) -> anyhow::Result<DemoConfig> {
    match path {
        None => Ok(DemoConfig::default()),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_file_is_the_default() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/demo.toml"));
        let c = load_config(Some(path)).unwrap();
        assert_eq!(c.rotation_ttl, DemoConfig::default().rotation_ttl);
        assert_eq!(c.policy, Some(demo_policy()));
        assert!(c.wasm.is_none());
    }

    #[test]
    fn unknown_demo_setting_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(&path, "rotation = \"8s\"\n").unwrap();
        assert!(load_config(Some(&path)).is_err());
    }

    #[test]
    fn readme_section_is_replaced_between_markers() {
        let readme = "a\n<!-- demo-output:start -->\nold\n<!-- demo-output:end -->\nb\n";
        let out = splice_readme(readme, "new\n").unwrap();
        assert_eq!(
            out,
            "a\n<!-- demo-output:start -->\n```text\nnew\n```\n<!-- demo-output:end -->\nb\n"
        );
        assert!(splice_readme("no markers", "x").is_err());
    }

    #[test]
    fn plugin_stat_names_split_into_family_and_tags() {
        let (family, tags) = parse_plugin_stat(
            "wasmcustom.action=.=allow;.;rule=.=r1;.;mode=.=enforce;.;meshward_decisions_total",
        )
        .unwrap();
        assert_eq!(family, DECISIONS);
        assert_eq!(
            tags,
            vec![("action", "allow"), ("rule", "r1"), ("mode", "enforce")]
        );
        assert_eq!(
            parse_plugin_stat("wasmcustom.meshward_peer_cert_validity_unknown_total"),
            Some(("meshward_peer_cert_validity_unknown_total", vec![]))
        );
        assert_eq!(
            parse_plugin_stat("cluster.inbound|80||.upstream_rq_total"),
            None
        );
        assert_eq!(parse_plugin_stat("wasmcustom.broken;.;family"), None);
    }

    fn counters(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn decision_is_the_counter_that_moved() {
        let allow =
            "wasmcustom.action=.=allow;.;rule=.=r1;.;mode=.=enforce;.;meshward_decisions_total";
        let deny =
            "wasmcustom.action=.=deny;.;rule=.=r2;.;mode=.=enforce;.;meshward_decisions_total";
        let audit =
            "wasmcustom.action=.=audit;.;rule=.=a;.;mode=.=enforce;.;meshward_decisions_total";
        let before = counters(&[(allow, 1)]);
        let after = counters(&[(allow, 1), (audit, 1), (deny, 1)]);
        assert_eq!(
            decision_between(&before, &after),
            Some(Counted {
                action: "deny".into(),
                rule: "r2".into()
            })
        );
        assert_eq!(decision_between(&after, &after), None);
    }

    #[test]
    fn only_the_plugins_counters_are_kept() {
        let stats = vec![
            (
                "wasmcustom.meshward_peer_cert_validity_unknown_total".to_owned(),
                "0".to_owned(),
            ),
            ("server.live".to_owned(), "1".to_owned()),
            (
                "wasmcustom.meshward_peer_cert_age_seconds".to_owned(),
                "P0(nan,1)".to_owned(),
            ),
        ];
        assert_eq!(
            plugin_counters(stats),
            counters(&[("wasmcustom.meshward_peer_cert_validity_unknown_total", 0)])
        );
    }

    #[test]
    fn xfcc_hash_is_read_from_the_first_element() {
        let xfcc = "By=spiffe://cluster.local/ns/shop/sa/backend;Hash=ab12;Cert=\"-----BEGIN%20CERTIFICATE\";\
                    Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/frontend,By=x;Hash=cd34";
        assert_eq!(xfcc_hash(xfcc), Some("ab12"));
        assert_eq!(xfcc_hash("By=x;URI=y"), None);
    }

    #[test]
    fn envoy_serials_are_those_of_the_identity_normalized() {
        let certs = json!({"certificates": [
            {"ca_cert": [{"serial_number": "01"}],
             "cert_chain": [{"serial_number": "00AB:cd",
                             "subject_alt_names": [{"uri": "spiffe://cluster.local/ns/shop/sa/frontend"}]}]},
            {"cert_chain": [{"serial_number": "abcd",
                             "subject_alt_names": [{"uri": "spiffe://cluster.local/ns/shop/sa/frontend"}]},
                            {"serial_number": "ff", "subject_alt_names": [{"uri": "spiffe://other"}]}]}
        ]});
        assert_eq!(
            envoy_cert_serials(&certs, "spiffe://cluster.local/ns/shop/sa/frontend"),
            vec!["abcd".to_owned()]
        );
        assert_eq!(normalize_serial("000"), "0");
    }

    #[test]
    fn only_the_filters_prometheus_families_are_shown() {
        let text = "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n\
                    # TYPE meshward_decisions_total counter\n\
                    meshward_decisions_total{action=\"allow\"} 5\n\
                    meshward_peer_cert_age_seconds_count 9\n";
        assert_eq!(
            filter_prometheus(text),
            "# TYPE meshward_decisions_total counter\nmeshward_decisions_total{action=\"allow\"} 5\n\
             meshward_peer_cert_age_seconds_count 9\n"
        );
        assert_eq!(prometheus_value(text, CERT_AGE_COUNT), Some(9.0));
        assert_eq!(
            prometheus_value("meshward_peer_cert_age_seconds_count{} 3\n", CERT_AGE_COUNT),
            Some(3.0)
        );
        assert_eq!(
            prometheus_value(text, "meshward_peer_cert_age_seconds"),
            None
        );
    }

    #[test]
    fn the_demo_policy_is_described_from_its_rules() {
        assert_eq!(
            describe_policy(&demo_policy()),
            "mode enforce; ALLOW frontend-reads-api from cluster.local/ns/shop/sa/frontend \
             GET /api/* when maxCertAge 12h; DENY deny-reporter from cluster.local/ns/batch/sa/reporter"
        );
    }
}
