//! A child `bao server` on 127.0.0.1, killed by its PID when dropped:
//! `-dev` (storage in memory, unsealed at start) or raft storage in a temp
//! dir (initialised and unsealed here with one key share). Its HTTPS
//! listener's certificate (P-256, IP SAN 127.0.0.1) and CA are made here
//! with rcgen. Provisioned over the HTTP API with the root token: the `pki`
//! root and the `pki_int` intermediate (EC P-256 keys generated inside
//! OpenBao), the two roles, the sign policy and a token holding only it.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{
    INT_MOUNT, Listener, NO_STORE_ROLE, ROLE, ROOT_MOUNT, SIGN_POLICY, Storage, role_body,
    server_config, sign_policy,
};
use crate::signer_proc::{CpuTimes, Memory, parse_status_memory, process_cpu_times};

/// How long a server may take to answer, then to be active.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// One provisioning call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The listener's certificate, key and CA, PEM.
pub struct ListenerTls {
    /// The CA clients trust.
    pub ca_pem: String,
    /// The listener's certificate.
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
}

impl ListenerTls {
    /// A fresh P-256 CA and a P-256 server certificate for `127.0.0.1` and
    /// `localhost` signed by it.
    pub fn generate() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "meshward bench OpenBao listener CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
        leaf.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        leaf.distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = leaf.signed_by(&key, &ca)?;
        Ok(Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A running `bao server`.
pub struct BaoServer {
    child: Child,
    /// How it stores.
    pub storage: Storage,
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    /// The CA of the listener's certificate (PEM).
    pub ca_pem: String,
    /// A token whose only policy is [`SIGN_POLICY`].
    pub sign_token: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for BaoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaoServer")
            .field("pid", &self.child.id())
            .field("storage", &self.storage)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Drop for BaoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port P on 127.0.0.1 with P + 1 free as well (the cluster listener).
fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free pair of ports on 127.0.0.1")
}

/// An HTTPS client trusting only `ca_pem`, HTTP/1.1, no proxy.
pub fn client(ca_pem: &str, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).context("the listener CA")?;
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .http1_only()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .build()
        .context("building the HTTPS client")
}

impl BaoServer {
    /// Starts and provisions a server; a few attempts (a port can be taken
    /// between choosing and binding it).
    pub async fn start(bin: &Path, storage: Storage, work_dir: &Path) -> anyhow::Result<Self> {
        let mut last = None;
        for attempt in 1..=3 {
            match Self::try_start(bin, storage, work_dir).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    warn!(attempt, storage = storage.tag(), error = %format!("{e:#}"), "bao server start failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("bao server never started")))
    }

    async fn try_start(bin: &Path, storage: Storage, work_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("openbao-{}-", storage.tag()))
            .tempdir_in(work_dir)
            .context("creating the OpenBao temp dir")?;
        let tls = ListenerTls::generate()?;
        let cert_file = dir.path().join("listener-cert.pem");
        let key_file = dir.path().join("listener-key.pem");
        std::fs::write(&cert_file, &tls.cert_pem)?;
        std::fs::write(&key_file, &tls.key_pem)?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let port = free_port_pair()?;
        let listener = Listener {
            port,
            cluster_port: port + 1,
            cert_file: &cert_file,
            key_file: &key_file,
        };
        let config_file = dir.path().join("server.hcl");
        std::fs::write(&config_file, server_config(storage, &listener, &data_dir))?;
        let log = dir.path().join("bao.log");
        let out = std::fs::File::create(&log)?;

        let root_token = format!("root-{:016x}", rand::random::<u64>());
        let mut cmd = Command::new(bin);
        cmd.arg("server");
        if storage == Storage::Dev {
            let dev_port = free_port_pair()?;
            cmd.arg("-dev")
                .arg("-dev-no-store-token")
                .arg(format!("-dev-root-token-id={root_token}"))
                .arg(format!("-dev-listen-address=127.0.0.1:{dev_port}"));
        }
        cmd.arg(format!("-config={}", config_file.display()))
            .env("HOME", dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("BAO_API_ADDR")
            .env_remove("BAO_CLUSTER_ADDR")
            .env_remove("BAO_DEV_ROOT_TOKEN_ID")
            .env_remove("BAO_DEV_LISTEN_ADDRESS")
            .env_remove("BAO_CONFIG_PATH")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = Self {
            child,
            storage,
            base: format!("https://127.0.0.1:{port}"),
            ca_pem: tls.ca_pem,
            sign_token: String::new(),
            log,
            _dir: dir,
        };
        let client = client(&server.ca_pem, CALL_TIMEOUT)?;
        let root_token = match server.bring_up(&client, root_token).await {
            Ok(t) => t,
            Err(e) => return Err(e.context(format!("log:\n{}", server.log_tail()))),
        };
        server.sign_token = server
            .provision(&client, &root_token)
            .await
            .with_context(|| format!("provisioning; log:\n{}", server.log_tail()))?;
        info!(pid = server.pid(), base = %server.base, storage = storage.tag(), "bao server ready");
        Ok(server)
    }

    /// Waits until the server answers, initialises and unseals it (raft),
    /// waits until it is active; the root token.
    async fn bring_up(
        &mut self,
        client: &reqwest::Client,
        dev_root: String,
    ) -> anyhow::Result<String> {
        self.wait_health(client, |_| true).await?;
        let root = match self.storage {
            Storage::Dev => dev_root,
            Storage::Raft => {
                let init = self
                    .call(
                        client,
                        reqwest::Method::POST,
                        "sys/init",
                        None,
                        Some(json!({"secret_shares": 1, "secret_threshold": 1})),
                    )
                    .await?;
                let key = init
                    .pointer("/keys_base64/0")
                    .and_then(Value::as_str)
                    .context("sys/init: no keys_base64")?
                    .to_string();
                let root = init
                    .get("root_token")
                    .and_then(Value::as_str)
                    .context("sys/init: no root_token")?
                    .to_string();
                let unseal = self
                    .call(
                        client,
                        reqwest::Method::POST,
                        "sys/unseal",
                        None,
                        Some(json!({ "key": key })),
                    )
                    .await?;
                anyhow::ensure!(
                    unseal.get("sealed") == Some(&Value::Bool(false)),
                    "still sealed after the unseal key: {unseal}"
                );
                root
            }
        };
        // 200: initialised, unsealed and active.
        self.wait_health(client, |status| status == 200).await?;
        Ok(root)
    }

    /// Polls `GET /v1/sys/health` until `done(status)`, bounded; fails at
    /// once when the server exits.
    async fn wait_health(
        &mut self,
        client: &reqwest::Client,
        done: impl Fn(u16) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/v1/sys/health", self.base);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("bao server exited: {status}");
            }
            let last = match client.get(&url).send().await {
                Ok(r) if done(r.status().as_u16()) => return Ok(()),
                Ok(r) => format!("status {}", r.status()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("bao server not ready after {READY_TIMEOUT:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One API call; the answer's JSON (`Null` when empty). A non-2xx
    /// answer is an error carrying OpenBao's `errors`.
    async fn call(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = client.request(method.clone(), format!("{}/v1/{path}", self.base));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("{method} {path}"))?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text}"))
    }

    /// The reference flow (docs/vault.md) with keys generated inside
    /// OpenBao: root, intermediate, roles, policy; the load token.
    async fn provision(&self, client: &reqwest::Client, root: &str) -> anyhow::Result<String> {
        use reqwest::Method;
        let call = |method: Method, path: String, body: Value| async move {
            self.call(client, method, &path, Some(root), Some(body))
                .await
        };
        call(
            Method::POST,
            format!("sys/mounts/{ROOT_MOUNT}"),
            json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
        )
        .await?;
        call(
            Method::POST,
            format!("{ROOT_MOUNT}/root/generate/internal"),
            json!({"common_name": "meshward bench root", "key_type": "ec", "key_bits": 256, "ttl": "87600h"}),
        )
        .await?;
        call(
            Method::POST,
            format!("sys/mounts/{INT_MOUNT}"),
            json!({"type": "pki", "config": {"max_lease_ttl": "43800h"}}),
        )
        .await?;
        let csr = call(
            Method::POST,
            format!("{INT_MOUNT}/intermediate/generate/internal"),
            json!({"common_name": "istioca", "key_type": "ec", "key_bits": 256}),
        )
        .await?;
        let csr = csr
            .pointer("/data/csr")
            .and_then(Value::as_str)
            .context("intermediate/generate: no csr")?
            .to_string();
        let signed = call(
            Method::POST,
            format!("{ROOT_MOUNT}/root/sign-intermediate"),
            json!({"csr": csr, "format": "pem_bundle", "ttl": "43800h"}),
        )
        .await?;
        let cert = signed
            .pointer("/data/certificate")
            .and_then(Value::as_str)
            .context("sign-intermediate: no certificate")?
            .to_string();
        call(
            Method::POST,
            format!("{INT_MOUNT}/intermediate/set-signed"),
            json!({ "certificate": cert }),
        )
        .await?;
        for (role, no_store) in [(ROLE, false), (NO_STORE_ROLE, true)] {
            call(
                Method::POST,
                format!("{INT_MOUNT}/roles/{role}"),
                role_body(no_store),
            )
            .await?;
        }
        call(
            Method::PUT,
            format!("sys/policies/acl/{SIGN_POLICY}"),
            json!({ "policy": sign_policy() }),
        )
        .await?;
        let token = call(
            Method::POST,
            "auth/token/create".to_string(),
            json!({"policies": [SIGN_POLICY], "no_default_policy": true, "ttl": "768h"}),
        )
        .await?;
        let token = token
            .pointer("/auth/client_token")
            .and_then(Value::as_str)
            .context("token/create: no client_token")?;
        Ok(token.to_string())
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user and system, every thread) the server has used so far.
    pub fn cpu_times(&self) -> anyhow::Result<CpuTimes> {
        process_cpu_times(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Resident memory now and at its peak.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let path = format!("/proc/{}/status", self.child.id());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_status_memory(&text)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .get(lines.len().saturating_sub(30)..)
            .unwrap_or_default()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_tls_is_a_p256_chain_for_127_0_0_1() {
        let tls = ListenerTls::generate().unwrap();
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        let key = KeyPair::from_pem(&tls.key_pem).unwrap();
        assert!(key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
        // The client accepts the CA.
        client(&tls.ca_pem, Duration::from_secs(1)).unwrap();
    }
}
