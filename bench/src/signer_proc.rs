//! The signer under test: the release `meshward-signer` binary started as a
//! child process (its own tokio runtime, its own CPU accounting), on
//! 127.0.0.1 with a fresh built-in CA and a service-account token issuer
//! whose public key it trusts.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::config::Config;
use meshward_signer::issuer::builtin::CaKeyAlgorithm;

/// The `iss` of the bench's service-account tokens.
pub const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Where the signer under test records its issuance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    /// `ledger.enabled = false`.
    Off,
    /// The default: a SQLite file in the signer's data dir.
    Sqlite,
    /// `[ledger.postgres]`: a PostgreSQL server the bench starts on
    /// 127.0.0.1 (same machine, same disk).
    Postgres,
}

impl LedgerKind {
    /// For the report.
    pub fn label(self) -> &'static str {
        match self {
            LedgerKind::Off => "off",
            LedgerKind::Sqlite => "SQLite",
            LedgerKind::Postgres => "PostgreSQL",
        }
    }
}

/// How to start the signer.
#[derive(Debug, Clone)]
pub struct SignerSetup {
    /// The `meshward-signer` executable.
    pub binary: PathBuf,
    /// The CA's key type (matches the CSR key type under test).
    pub ca_key: CaKeyAlgorithm,
    /// `server.max_concurrent_requests`.
    pub max_concurrent_requests: usize,
    /// The ledger store.
    pub ledger: LedgerKind,
    /// Where the CA data dir, ledger and config go (a fresh temp dir inside).
    pub work_dir: PathBuf,
}

/// A running child signer; killed (by its PID) when dropped.
pub struct ChildSigner {
    child: Child,
    /// The CA API address.
    pub grpc_addr: SocketAddr,
    /// The admin address (`/metrics`), when the serving line gave it.
    pub admin_addr: Option<SocketAddr>,
    /// The CA's roots, to verify the serving certificate.
    pub roots_pem: String,
    /// Mints tokens the signer accepts.
    pub tokens: TokenIssuer,
    /// The PostgreSQL server of a `LedgerKind::Postgres` signer (stopped
    /// after the signer: fields drop after `Drop::drop` killed it).
    database: Option<crate::pg_server::Postgres>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for ChildSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSigner")
            .field("pid", &self.child.id())
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

impl ChildSigner {
    /// Write the config, start the binary, wait until it serves.
    pub fn start(setup: &SignerSetup) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&setup.work_dir)
            .with_context(|| format!("creating {}", setup.work_dir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("signer-")
            .tempdir_in(&setup.work_dir)
            .context("creating the signer's temp dir")?;
        let tokens = TokenIssuer::generate(TOKEN_ISSUER, JwtAlgorithm::Es256)
            .map_err(|e| anyhow::anyhow!("token issuer: {e}"))?;
        let key_file = dir.path().join("sa-signing-key.pub");
        tokens
            .write_public_key_pem(&key_file)
            .context("writing the token public key")?;

        let mut config = Config::default();
        config.server.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.server.admin_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.server.max_concurrent_requests = setup.max_concurrent_requests;
        config.ca.data_dir = dir.path().join("ca");
        config.ca.key_algorithm = setup.ca_key;
        config.ledger.enabled = setup.ledger != LedgerKind::Off;
        let database = (setup.ledger == LedgerKind::Postgres)
            .then(|| {
                let pg = crate::pg_server::Postgres::start().context(
                    "MESHWARD_SKIP_POSTGRES_TESTS=1 but the PostgreSQL row was asked for",
                )?;
                pg.create_database("meshward");
                config.ledger.postgres = Some(meshward_signer::ledger::PostgresConfig {
                    url: pg.url("meshward"),
                    password_file: Some(pg.password_file()),
                    tls: meshward_signer::ledger::PostgresTlsMode::Disable,
                    replica: Some("bench".to_string()),
                    ..Default::default()
                });
                anyhow::Ok(pg)
            })
            .transpose()?;
        // Each closed-loop client re-asks for its identity hundreds of times
        // a second; the per-pod rate limit would refuse all but the first.
        config.policy.rate_limit_burst = 0;
        // Every client of the load generator comes from 127.0.0.1.
        config.server.max_connections_per_ip = config.server.max_connections;
        for j in &mut config.authn.jwt {
            j.jwks_file = None;
            j.public_key_file = Some(key_file.clone());
        }
        let config_file = dir.path().join("signer.toml");
        std::fs::write(&config_file, config.to_toml()?).context("writing the signer config")?;

        let mut child = Command::new(&setup.binary)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config_file)
            .env_remove("MESHWARD_GRPC_ADDR")
            .env_remove("MESHWARD_ADMIN_ADDR")
            .env_remove("MESHWARD_DATA_DIR")
            .env_remove("MESHWARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", setup.binary.display()))?;
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            drain(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, tx);
        }
        let (grpc_addr, admin_addr) = match wait_for_serving(&rx, Duration::from_secs(120)) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let roots_pem = std::fs::read_to_string(dir.path().join("ca").join("root-cert.pem"))
            .context("reading the signer's root-cert.pem")?;
        Ok(Self {
            child,
            grpc_addr,
            admin_addr,
            roots_pem,
            tokens,
            database,
            _dir: dir,
        })
    }

    /// CPU time the PostgreSQL server (the postmaster and every process it
    /// forked: backends, WAL writer, checkpointer) has used so far; `None`
    /// without one.
    pub fn database_cpu_times(&self) -> Option<CpuTimes> {
        let postmaster = self.database.as_ref()?.pid()?;
        Some(process_tree_cpu_times(postmaster))
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user and system, all threads) the signer has used so far.
    pub fn cpu_times(&self) -> anyhow::Result<CpuTimes> {
        process_cpu_times(&format!("/proc/{}/stat", self.child.id()))
    }

    /// [`ChildSigner::cpu_times`], user + system.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        Ok(self.cpu_times()?.total())
    }

    /// The signer's resident memory now and at its peak so far.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let path = format!("/proc/{}/status", self.child.id());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_status_memory(&text).with_context(|| format!("parsing {path}"))
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now (bytes).
    pub rss: u64,
    /// `VmHWM`: the most it has been resident since it started (bytes) — what
    /// a container memory limit must leave room for.
    pub peak_rss: u64,
}

impl Memory {
    /// Bytes as MiB, for the report.
    pub fn mib(bytes: u64) -> f64 {
        bytes as f64 / (1024.0 * 1024.0)
    }
}

/// `VmRSS` and `VmHWM` (reported in kB) from the text of `/proc/<pid>/status`.
pub fn parse_status_memory(text: &str) -> anyhow::Result<Memory> {
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("no {name}"))?;
        let kb = line
            .trim()
            .strip_suffix("kB")
            .with_context(|| format!("{name} is not in kB: {line:?}"))?
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{name}: {line:?}"))?;
        Ok(kb.saturating_mul(1024))
    };
    Ok(Memory {
        rss: field("VmRSS")?,
        peak_rss: field("VmHWM")?,
    })
}

impl Drop for ChildSigner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forward the child's output lines (stdout: JSON logs) to `tx` and keep the
/// pipe drained so the child never blocks on a full pipe.
fn drain(stream: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        let mut forward = true;
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if forward && tx.send(line).is_err() {
                forward = false;
            }
        }
    });
}

/// The gRPC and admin addresses, once the signer reports serving.
fn wait_for_serving(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "the signer did not report serving within {timeout:?}; last output:\n{}",
                    last.join("\n")
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!(
                    "the signer exited before serving; output:\n{}",
                    last.join("\n")
                )
            }
        };
        if let Some(addr) = serving_addr(&line) {
            return Ok((addr, serving_field(&line, "admin_addr")));
        }
        last.push(line);
        if last.len() > 20 {
            last.remove(0);
        }
    }
}

/// The gRPC address from the signer's JSON "meshward-signer serving" log line.
pub fn serving_addr(line: &str) -> Option<SocketAddr> {
    serving_field(line, "grpc_addr")
}

/// An address field of the "meshward-signer serving" log line.
fn serving_field(line: &str, field: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "meshward-signer serving" {
        return None;
    }
    fields.get(field)?.as_str()?.parse().ok()
}

/// `GET /metrics` from a signer's admin port (HTTP/1.0, so the body is not
/// chunked), bounded by `timeout`.
pub async fn scrape_metrics(admin: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: signer\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(timeout, fetch)
        .await
        .context("scraping the signer's /metrics timed out")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end in the /metrics answer")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!(
            "/metrics answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}

/// The ledger's group commits so far, from `/metrics` text: (records, commits)
/// — `meshward_signer_ledger_commit_group_size` sum and count.
pub fn ledger_commits(metrics: &str) -> Option<(f64, f64)> {
    Some((
        metric_sample(metrics, "meshward_signer_ledger_commit_group_size_sum")?,
        metric_sample(metrics, "meshward_signer_ledger_commit_group_size_count")?,
    ))
}

/// `meshward_signer_requests_total` by outcome from `/metrics` text, in the
/// order the signer lists them.
pub fn requests_by_outcome(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("meshward_signer_requests_total{outcome=\"")?;
            let (outcome, rest) = rest.split_once("\"}")?;
            let value = rest.trim().parse::<f64>().ok()?;
            Some((outcome.to_string(), value))
        })
        .collect()
}

/// The value of an unlabelled sample `name` in `/metrics` text.
pub fn metric_sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on Linux when unknown).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU time of a process (or thread) in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// `utime`.
    pub user: Duration,
    /// `stime`: system calls, page faults, and on loopback the receiving
    /// side's TCP processing of what this process sends.
    pub system: Duration,
}

impl CpuTimes {
    /// User + system.
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// What was used since `earlier`.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// utime and stime from `/proc/<pid>/stat` (or `/proc/thread-self/stat`).
pub fn process_cpu_times(stat_path: &str) -> anyhow::Result<CpuTimes> {
    let text =
        std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    let (user, system) =
        parse_stat_user_system(&text).with_context(|| format!("parsing {stat_path}"))?;
    let ticks = clock_ticks();
    Ok(CpuTimes {
        user: Duration::from_secs_f64(user as f64 / ticks),
        system: Duration::from_secs_f64(system as f64 / ticks),
    })
}

/// CPU time of `root` and its direct children (every process whose parent
/// it is), from `/proc`. A process that exits between readings takes its
/// time with it, so this suits long-lived trees (a database server).
pub fn process_tree_cpu_times(root: u32) -> CpuTimes {
    let mut total = CpuTimes::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    let ticks = clock_ticks();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if pid != root && parse_stat_ppid(&text) != Some(root) {
            continue;
        }
        if let Ok((user, system)) = parse_stat_user_system(&text) {
            total.user += Duration::from_secs_f64(user as f64 / ticks);
            total.system += Duration::from_secs_f64(system as f64 / ticks);
        }
    }
    total
}

/// The parent PID (field 4) from the text of `/proc/<pid>/stat`.
pub fn parse_stat_ppid(text: &str) -> Option<u32> {
    let after = text.get(text.rfind(')')? + 1..)?;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of the children a process has waited for (`cutime`, `cstime`
/// of its `/proc/<pid>/stat`): a child's time is added when it is reaped, so
/// the difference across a span counts the children reaped in it.
pub fn waited_children_cpu_times(stat_path: &str) -> anyhow::Result<CpuTimes> {
    let text =
        std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    let (user, system) =
        parse_stat_children(&text).with_context(|| format!("parsing {stat_path}"))?;
    let ticks = clock_ticks();
    Ok(CpuTimes {
        user: Duration::from_secs_f64(user as f64 / ticks),
        system: Duration::from_secs_f64(system as f64 / ticks),
    })
}

/// (cutime, cstime) in clock ticks (fields 16 and 17) from the text of
/// `/proc/<pid>/stat`.
pub fn parse_stat_children(text: &str) -> anyhow::Result<(u64, u64)> {
    let after = text
        .rfind(')')
        .and_then(|i| text.get(i + 1..))
        .context("no `)` after the command name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let cutime: u64 = fields.get(13).context("no cutime")?.parse()?;
    let cstime: u64 = fields.get(14).context("no cstime")?.parse()?;
    Ok((cutime, cstime))
}

/// utime + stime of a process from its `/proc/<pid>/stat`.
pub fn process_cpu_time(stat_path: &str) -> anyhow::Result<Duration> {
    Ok(process_cpu_times(stat_path)?.total())
}

/// (utime, stime) in clock ticks from the text of `/proc/<pid>/stat`. The
/// command name may hold spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_stat_user_system(text: &str) -> anyhow::Result<(u64, u64)> {
    let after = text
        .rfind(')')
        .and_then(|i| text.get(i + 1..))
        .context("no `)` after the command name")?;
    // After the name: state(3) ppid(4) … utime(14) stime(15); index 0 = field 3.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime, stime))
}

/// The `meshward-signer` binary next to this one (same target dir).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join(name);
    p.is_file().then_some(p)
}

/// The file system type of `path` (from `df -T`), for the report.
pub fn filesystem_type(path: &Path) -> String {
    Command::new("df")
        .arg("-T")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_survive_a_command_name_with_spaces_and_parens() {
        let text =
            "1234 (tokio (rt) w) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 1 0 0";
        assert_eq!(parse_stat_user_system(text).unwrap(), (250, 37));
        assert!(parse_stat_user_system("1234 (x) S 1").is_err());
        assert!(parse_stat_user_system("no paren").is_err());
    }

    #[test]
    fn resident_and_peak_memory_are_read_from_proc_status() {
        let text = "Name:\tmeshward-signer\nVmPeak:\t  900000 kB\nVmHWM:\t   61440 kB\nVmRSS:\t   40960 kB\nThreads:\t5\n";
        assert_eq!(
            parse_status_memory(text).unwrap(),
            Memory {
                rss: 40 * 1024 * 1024,
                peak_rss: 60 * 1024 * 1024
            }
        );
        assert!(parse_status_memory("VmRSS:\t1 kB\n").is_err());
        assert!(parse_status_memory("VmRSS:\t1 MB\nVmHWM:\t1 kB\n").is_err());
    }

    #[test]
    fn serving_line_is_found_only_in_the_serving_message() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"meshward-signer serving","grpc_addr":"127.0.0.1:4321","admin_addr":"127.0.0.1:1"}}"#;
        assert_eq!(serving_addr(line), Some("127.0.0.1:4321".parse().unwrap()));
        let other =
            r#"{"fields":{"message":"created a new built-in CA","grpc_addr":"127.0.0.1:1"}}"#;
        assert_eq!(serving_addr(other), None);
        assert_eq!(serving_addr("not json"), None);
    }

    #[test]
    fn parent_pid_is_read_after_the_command_name() {
        // A command name with spaces and a parenthesis.
        let text = "4242 (postgres: w (x)) S 4100 4100 4100 0 -1 4194560 1 0 0 0 7 3 0 0";
        assert_eq!(parse_stat_ppid(text), Some(4100));
        assert_eq!(parse_stat_ppid("4242 (x"), None);
        // The tree of this process counts this process: burn some CPU, then
        // the tree shows at least what the process alone showed before.
        let mut x = 0u64;
        let alone = loop {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
            let t = process_cpu_times("/proc/self/stat").unwrap();
            if t.total() >= Duration::from_millis(30) {
                break t;
            }
        };
        let tree = process_tree_cpu_times(std::process::id());
        assert!(tree.total() >= alone.total(), "{tree:?} < {alone:?}");
    }

    #[test]
    fn waited_children_ticks_are_fields_16_and_17() {
        let text = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 900 41 20 0 9";
        assert_eq!(parse_stat_children(text).unwrap(), (900, 41));
        assert!(parse_stat_children("1234 (x) S 1 2 3").is_err());
        assert!(waited_children_cpu_times("/proc/self/stat").is_ok());
    }

    #[test]
    fn requests_are_read_by_outcome() {
        let text = "# TYPE meshward_signer_requests counter
meshward_signer_requests_total{outcome=\"issued\"} 4096
meshward_signer_requests_total{outcome=\"unauthenticated\"} 3
meshward_signer_issuance_duration_seconds_count 4096
";
        assert_eq!(
            requests_by_outcome(text),
            vec![
                ("issued".to_string(), 4096.0),
                ("unauthenticated".to_string(), 3.0)
            ]
        );
        assert!(requests_by_outcome("meshward_signer_requests_total 5\n").is_empty());
    }

    #[test]
    fn ledger_commits_are_read_from_the_group_size_histogram() {
        let text = "# TYPE meshward_signer_ledger_commit_group_size histogram
meshward_signer_ledger_commit_group_size_sum 27051.0
meshward_signer_ledger_commit_group_size_count 6126
meshward_signer_ledger_commit_group_size_bucket{le=\"1.0\"} 3
";
        assert_eq!(ledger_commits(text), Some((27051.0, 6126.0)));
        assert_eq!(ledger_commits("meshward_signer_requests_total 5\n"), None);
    }
}
