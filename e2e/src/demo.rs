//! The demo: a signer, three workloads in two namespaces, the filter on the
//! backend's sidecar, real requests, a certificate rotation, the metrics.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Deserialize;

use crate::host::CompiledPlugin;
use crate::host::metrics::{Metrics, parse_stat_name};
use crate::mesh::backend::spawn_echo;
use crate::mesh::{LocalSigner, MeshContext, MeshResponse, Sidecar, SidecarConfig};

/// Demo settings (`--config demo.toml`); every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Certificate lifetime of the workload that shows a rotation.
    #[serde(with = "humantime_secs")]
    pub rotation_ttl: Duration,
    /// The backend's HTTP filter `pluginConfig`; default: [`demo_policy`].
    pub policy: Option<serde_json::Value>,
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
pub fn demo_policy() -> serde_json::Value {
    serde_json::json!({
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

/// Which decision counter moved between two snapshots: (action, rule).
fn decision_between(before: &[(String, u64)], after: &[(String, u64)]) -> Option<(String, String)> {
    for (name, value) in after {
        let old = before
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v);
        if *value > old {
            let (family, tags) = parse_stat_name(name);
            if family != "meshward_decisions_total" {
                continue;
            }
            let tag = |k: &str| {
                tags.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            if tag("action") == "audit" {
                continue;
            }
            return Some((tag("action"), tag("rule")));
        }
    }
    None
}

struct Table {
    out: String,
}

impl Table {
    fn new() -> Self {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<34} {:<20} {:<9} {:<22} {:>8} {:>9}",
            "caller (SPIFFE ID)", "request", "decision", "rule", "cert age", "remaining"
        );
        let _ = writeln!(out, "{}", "-".repeat(107));
        Self { out }
    }

    fn row(
        &mut self,
        caller: &str,
        request: &str,
        r: &MeshResponse,
        decision: Option<(String, String)>,
    ) {
        let now = SystemTime::now();
        let (age, remaining) = r
            .client_cert
            .as_ref()
            .map_or(("-".to_owned(), "-".to_owned()), |c| {
                (secs(c.age(now)), secs(c.remaining(now)))
            });
        let (action, rule) = decision.unwrap_or_else(|| ("?".into(), "?".into()));
        let _ = writeln!(
            self.out,
            "{:<34} {:<20} {:<9} {:<22} {:>8} {:>9}",
            caller.trim_start_matches("spiffe://"),
            request,
            format!("{action} {}", r.status),
            rule,
            age,
            remaining
        );
    }

    fn note(&mut self, text: &str) {
        let _ = writeln!(self.out, "  {text}");
    }
}

async fn call(
    table: &mut Table,
    metrics: &Metrics,
    from: &Sidecar,
    to: &Sidecar,
    method: &str,
    path: &str,
) -> anyhow::Result<()> {
    let before = metrics.counters();
    let r = from
        .request(to.inbound_addr(), Some(to.identity()), method, path, &[])
        .await
        .with_context(|| format!("{} {method} {path}", from.identity()))?;
    let decision = decision_between(&before, &metrics.counters());
    table.row(from.identity(), &format!("{method} {path}"), &r, decision);
    Ok(())
}

/// Runs the demo and returns what it prints.
pub async fn run(config: DemoConfig) -> anyhow::Result<String> {
    let wasm = match &config.wasm {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => crate::wasm::read_filter_wasm()?,
    };
    let policy = config.policy.clone().unwrap_or_else(demo_policy);
    let mut out = String::new();
    let dir = tempfile::tempdir()?;
    let signer = LocalSigner::start(&dir.path().join("ca"), Duration::from_secs(24 * 3600)).await?;
    let _ = writeln!(
        out,
        "signer: built-in CA in a temporary data dir, Istio CA API on {} (gRPC/TLS), admin on {}",
        signer.grpc_addr()?,
        signer.admin_addr()?
    );
    let filter = CompiledPlugin::compile(&wasm)?;
    let _ = writeln!(
        out,
        "filter: meshward_filter.wasm ({} KiB) on the proxy-wasm host, HTTP filter on shop/backend",
        wasm.len() / 1024
    );
    let mesh = MeshContext {
        signer_grpc: signer.grpc_addr()?,
        signer_admin: signer.admin_addr()?,
        roots_pem: signer.roots_pem()?,
        tokens: signer.tokens(),
        filter,
    };
    let (app, _app_task) = spawn_echo("backend").await?;
    let mut bc = SidecarConfig::new("shop", "backend");
    bc.backend = Some(app);
    bc.http_filter = Some(policy.to_string());
    let backend = Sidecar::start(bc, &mesh).await?;
    let frontend = Sidecar::start(SidecarConfig::new("shop", "frontend"), &mesh).await?;
    let reporter = Sidecar::start(SidecarConfig::new("batch", "reporter"), &mesh).await?;
    let _ = writeln!(
        out,
        "workloads: {}, {}, {} (each got its certificate over gRPC with its service-account token)",
        frontend.identity(),
        backend.identity(),
        reporter.identity()
    );
    let _ = writeln!(
        out,
        "policy: ALLOW frontend GET /api/* (cert younger than 12h); DENY batch/reporter\n"
    );

    let metrics = backend.metrics();
    let mut table = Table::new();
    for (from, method, path) in [
        (&frontend, "GET", "/api/orders"),
        (&frontend, "GET", "/api/orders/42"),
        (&frontend, "POST", "/api/orders"),
        (&frontend, "GET", "/admin"),
        (&reporter, "GET", "/api/orders"),
        (&reporter, "GET", "/healthz"),
    ] {
        call(&mut table, &metrics, from, &backend, method, path).await?;
    }

    // Rotation: a frontend replica with short-lived certificates.
    let mut rc = SidecarConfig::new("shop", "frontend");
    rc.cert_ttl = config.rotation_ttl;
    let rotating = Sidecar::start(rc, &mesh).await?;
    table.note(&format!(
        "shop/frontend replica with {}-second certificates, rotated at 50-80% of their lifetime:",
        config.rotation_ttl.as_secs()
    ));
    call(
        &mut table,
        &metrics,
        &rotating,
        &backend,
        "GET",
        "/api/orders",
    )
    .await?;
    let first = rotating.cert().context("no certificate")?;
    let wait = config.rotation_ttl.mul_f64(0.4);
    tokio::time::sleep(wait).await;
    call(
        &mut table,
        &metrics,
        &rotating,
        &backend,
        "GET",
        "/api/orders",
    )
    .await?;
    let rotated = rotating
        .wait_for_rotation(first.generation, config.rotation_ttl * 2)
        .await?;
    table.note(&format!(
        "rotated: new key and certificate (generation {}), old one had {} left",
        rotated.generation,
        secs(first.remaining(SystemTime::now()))
    ));
    call(
        &mut table,
        &metrics,
        &rotating,
        &backend,
        "GET",
        "/api/orders",
    )
    .await?;

    out.push_str(&table.out);
    let _ = writeln!(out, "\nfilter metrics on shop/backend (Prometheus text):\n");
    out.push_str(&backend.metrics_prometheus());
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
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<DemoConfig> {
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
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/demo.toml"));
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
    fn decision_is_the_counter_that_moved() {
        let before = vec![(
            "action=.=allow;.;rule=.=r1;.;mode=.=enforce;.;meshward_decisions_total".to_owned(),
            1,
        )];
        let after = vec![
            (
                "action=.=allow;.;rule=.=r1;.;mode=.=enforce;.;meshward_decisions_total".to_owned(),
                1,
            ),
            (
                "action=.=deny;.;rule=.=r2;.;mode=.=enforce;.;meshward_decisions_total".to_owned(),
                1,
            ),
        ];
        assert_eq!(
            decision_between(&before, &after),
            Some(("deny".to_owned(), "r2".to_owned()))
        );
    }
}
