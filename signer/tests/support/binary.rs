//! The `meshward-signer serve` binary as an operator runs it: a config
//! file, JSON logs on stdout, signals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running `meshward-signer serve`.
pub struct Served {
    pub child: Child,
    pub grpc_addr: std::net::SocketAddr,
    pub roots_pem: String,
    pub tokens: Arc<TokenIssuer>,
    pub data_dir: PathBuf,
    pub jwks: PathBuf,
    pub config: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// The config file's text: loopback ports, the CA in `data`, tokens of
/// `jwks` trusted, the lab's rate limits off, then `extra` (TOML sections).
pub fn config_text(data: &Path, jwks: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
shutdown_drain = "5s"
[ca]
data_dir = {data:?}
[authn]
failure_limit_burst = 0
[[authn.jwt]]
issuer = "{ISSUER}"
jwks_file = {jwks:?}
{extra}
"#,
        data = data.display().to_string(),
        jwks = jwks.display().to_string(),
    )
}

impl Served {
    /// Writes the config (`policy` is the `[policy]` section's body) in
    /// `dir` and starts the binary on it; returns once it logged its address.
    pub fn start(dir: &Path, policy: &str) -> Self {
        let tokens = Arc::new(TokenIssuer::generate(ISSUER, JwtAlgorithm::Es256).unwrap());
        let jwks = dir.join("jwks.json");
        tokens.write_jwks(&jwks).unwrap();
        let data_dir = dir.join("ca");
        let config = dir.join("signer.toml");
        std::fs::write(
            &config,
            config_text(&data_dir, &jwks, &format!("[policy]\n{policy}")),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshward-signer"))
            .args([
                "--log-format",
                "json",
                "serve",
                "-c",
                config.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(addr) = v["fields"]["grpc_addr"].as_str()
                {
                    let _ = addr_tx.send(addr.to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let grpc_addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the signer never logged its address")
            .parse()
            .unwrap();
        let roots_pem = std::fs::read_to_string(data_dir.join("root-cert.pem")).unwrap();
        Self {
            child,
            grpc_addr,
            roots_pem,
            tokens,
            data_dir,
            jwks,
            config,
            log,
        }
    }

    /// Sends `signal` (`TERM`, `HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Lines logged so far (a mark for [`Served::wait_for_log_since`]).
    pub fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits (bounded) for a log line containing `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        self.wait_for_log_since(0, needle, limit)
    }

    /// [`Served::wait_for_log`] among the lines after `mark`.
    pub fn wait_for_log_since(&self, mark: usize, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .skip(mark)
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A token for `ns/sa` now.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.tokens
            .token_for(ns, sa, time::OffsetDateTime::now_utc().unix_timestamp())
            .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
