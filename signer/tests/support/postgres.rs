//! A real PostgreSQL server for the shared-ledger tests.
//!
//! [`Postgres::start`] finds the server binaries (installing them through
//! `scripts/postgres` when missing), runs `initdb` into a fresh temporary
//! directory and starts `postgres` on a free 127.0.0.1 port as a child
//! process — as `nobody` when the tests run as root, since postgres refuses
//! root — and waits (bounded) until `pg_isready` says it accepts
//! connections. Role `meshward` owns everything; TCP connections must give
//! [`PASSWORD`] (SCRAM), the fixture's own `psql` uses the Unix socket.
//! With `tls`, the server also speaks TLS with a certificate for 127.0.0.1
//! and `localhost` from a CA generated here ([`Postgres::ca_file`]).
//!
//! The server is stopped by PID (SIGINT, PostgreSQL's fast shutdown) in
//! [`Postgres::stop`] and in `Drop`. When the binaries cannot be had the
//! fixture panics saying so: these tests never skip silently.
//! `MESHWARD_SKIP_POSTGRES_TESTS=1` opts out locally (`start` returns `None`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code
)]

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

/// The role's password (TCP connections use SCRAM with it).
pub const PASSWORD: &str = "meshward-test-password";
/// The role every test connects as.
pub const USER: &str = "meshward";

/// uid / gid the server runs as when the tests run as root (`nobody`).
const UNPRIVILEGED: u32 = 65534;

pub struct Postgres {
    bindir: PathBuf,
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    tls: bool,
    /// uid/gid to run the server as, when not ourselves.
    run_as: Option<u32>,
}

fn skip_requested() -> bool {
    std::env::var("MESHWARD_SKIP_POSTGRES_TESTS").is_ok_and(|v| v == "1")
}

fn bindir() -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres");
        let out = Command::new(&script)
            .arg("--bindir")
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({})", script.display(), out.status));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
    .unwrap_or_else(|e| {
        panic!(
            "PostgreSQL (initdb, postgres, pg_isready, psql) is required for the shared-ledger \
             tests and could not be found or installed: {e}. Install Debian's postgresql package \
             or run scripts/postgres, set MESHWARD_PG_BINDIR, or opt out locally with \
             MESHWARD_SKIP_POSTGRES_TESTS=1"
        )
    })
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        == 0
}

/// A CA and a server certificate for 127.0.0.1 / localhost: (ca pem, cert
/// pem, key pem).
pub fn server_tls() -> (String, String, String) {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "meshward test database CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

impl Postgres {
    /// A fresh server; `None` only with `MESHWARD_SKIP_POSTGRES_TESTS=1`.
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// A fresh server that also speaks TLS ([`Postgres::ca_file`]).
    pub fn start_tls() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Self> {
        if skip_requested() {
            eprintln!("MESHWARD_SKIP_POSTGRES_TESTS=1: not running this PostgreSQL test");
            return None;
        }
        let bindir = bindir();
        let dir = tempfile::tempdir().unwrap();
        let run_as = running_as_root().then_some(UNPRIVILEGED);
        // The server user must reach its directories inside our temp dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut pg = Self {
            bindir,
            child: None,
            port: 0,
            dir,
            tls,
            run_as,
        };
        pg.init();
        let mut last = String::new();
        // A port can be taken between choosing and binding it: try a few.
        for _ in 0..3 {
            pg.port = free_port();
            match pg.spawn() {
                Ok(()) => return Some(pg),
                Err(e) => {
                    last = format!("{e}; log:\n{}", pg.log_tail());
                    eprintln!("postgres on port {} failed: {last}", pg.port);
                }
            }
        }
        panic!("could not start PostgreSQL: {last}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The postmaster's PID (its children are the server's other processes).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// PEM roots of the server's TLS certificate (with `start_tls`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A file holding [`PASSWORD`] (and a newline, as a Secret often has).
    pub fn password_file(&self) -> PathBuf {
        let path = self.dir.path().join("password");
        std::fs::write(&path, format!("{PASSWORD}\n")).unwrap();
        path
    }

    /// A directory the server user owns.
    fn owned_dir(&self, path: &Path, mode: u32) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some(uid) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
        }
    }

    /// A file the server user owns.
    fn owned_file(&self, path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some(uid) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some(uid) = self.run_as {
            cmd.uid(uid).gid(uid);
        }
        cmd.env("LC_ALL", "C").current_dir(self.dir.path());
        cmd
    }

    fn init(&self) {
        self.owned_dir(&self.data(), 0o700);
        self.owned_dir(&self.socket_dir(), 0o755);
        let pwfile = self.dir.path().join("initdb-password");
        self.owned_file(&pwfile, PASSWORD, 0o600);
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args(["-U", USER, "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if self.tls {
            let (ca, cert, key) = server_tls();
            std::fs::write(self.ca_file(), ca).unwrap();
            self.owned_file(&self.data().join("server.crt"), &cert, 0o644);
            self.owned_file(&self.data().join("server.key"), &key, 0o600);
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(|e| e.to_string())?;
        if let Some(uid) = self.run_as {
            std::os::unix::fs::chown(self.log(), Some(uid), Some(uid)).unwrap();
        }
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-c",
                "max_connections=100",
                "-c",
                "log_min_messages=warning",
            ]);
        if self.tls {
            cmd.args(["-c", "ssl=on"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning postgres: {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Bounded wait until `pg_isready` answers.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("postgres exited early: {status}"));
            }
            let ready = Command::new(self.bindir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("postgres not ready within 30s".to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs SQL as the owner through the Unix socket (`psql`).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A shell command running `psql` on `database` through the Unix socket
    /// (reads SQL from stdin).
    pub fn psql_command(&self, database: &str) -> String {
        format!(
            "{} -h {} -p {} -U {USER} -d {database} -X -q",
            self.bindir.join("psql").display(),
            self.socket_dir().display(),
            self.port
        )
    }

    /// A new, empty database.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// The connection string for `database` over TCP (no password in it).
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname={database}",
            self.port
        )
    }

    /// Fast shutdown (SIGINT by PID), bounded wait, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the stopped server again, same data and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn()
            .unwrap_or_else(|e| panic!("restarting postgres: {e}; log:\n{}", self.log_tail()));
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
