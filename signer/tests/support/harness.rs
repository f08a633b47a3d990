//! Shared test harness: a real signer on 127.0.0.1:0 with a temporary data
//! dir, a token issuer it trusts, and a CA client connected over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::PathBuf;

use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{
    CaClient, CallOptions, ClientError, IssuedCertificate, WorkloadKey, WorkloadKeyType,
};
use meshward_signer::config::{Config, JwtIssuerConfig};
use meshward_signer::{RunningSigner, Signer};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use tonic::Code;

pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap()
}

pub struct Harness {
    pub signer: RunningSigner,
    pub tokens: TokenIssuer,
    pub client: CaClient,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// A config for a signer on loopback ports, its CA in `dir`, trusting the
/// tokens of `tokens` through a JWKS file.
pub fn test_config(dir: &std::path::Path, tokens: &TokenIssuer) -> Config {
    let jwks = dir.join("jwks.json");
    tokens.write_jwks(&jwks).unwrap();
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.ca.data_dir = dir.join("ca");
    // A lab signer: tests ask for the same identity many times a minute. The
    // per-pod rate limit has its own tests, which turn it on.
    config.policy.rate_limit_burst = 0;
    // Refusal tests send many bad tokens from 127.0.0.1; the per-address
    // failure limit has its own test.
    config.authn.failure_limit_burst = 0;
    config.authn.jwt = vec![JwtIssuerConfig {
        jwks_file: Some(jwks),
        ..JwtIssuerConfig::new(K8S_ISSUER)
    }];
    config
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = TokenIssuer::generate(K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
        let mut config = test_config(dir.path(), &tokens);
        edit(&mut config);
        let signer = Signer::start(config.clone()).await.unwrap();
        let client = CaClient::connect(signer.grpc_addr(), signer.roots_pem(), "localhost")
            .await
            .unwrap();
        Self {
            signer,
            tokens,
            client,
            config,
            dir,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.ca.data_dir.clone()
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.tokens.token_for(ns, sa, now_unix()).unwrap()
    }

    pub fn opts(&self, ns: &str, sa: &str) -> CallOptions {
        CallOptions {
            token: Some(self.token(ns, sa)),
            ..CallOptions::default()
        }
    }

    /// Send a raw CSR as `ns/sa`.
    pub async fn send_csr(
        &self,
        csr: &str,
        ns: &str,
        sa: &str,
    ) -> Result<Vec<String>, ClientError> {
        self.client
            .create_certificate(csr, &self.opts(ns, sa))
            .await
    }

    /// A normal request for `ns/sa` with a fresh P-256 key.
    pub async fn issue(
        &self,
        ns: &str,
        sa: &str,
        opts: &CallOptions,
    ) -> Result<(WorkloadKey, IssuedCertificate), ClientError> {
        let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
        let cert = self
            .client
            .request_certificate(&key, &id(ns, sa), opts)
            .await?;
        Ok((key, cert))
    }

    /// A request for `target` with a fresh P-256 key and `opts`.
    pub async fn issue_for(
        &self,
        target: &SpiffeId,
        opts: &CallOptions,
    ) -> Result<(WorkloadKey, IssuedCertificate), ClientError> {
        let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
        let cert = self.client.request_certificate(&key, target, opts).await?;
        Ok((key, cert))
    }

    /// A TLS channel to the gRPC port, from `local` when given (e.g.
    /// 127.0.0.2, to be another client address than the harness's own).
    pub async fn channel_from(&self, local: Option<std::net::IpAddr>) -> tonic::transport::Channel {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                self.signer.roots_pem(),
            ))
            .domain_name("localhost");
        tonic::transport::Endpoint::from_shared(format!("https://{}", self.signer.grpc_addr()))
            .unwrap()
            .local_address(local)
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A client presenting `cert` (chain) and `key`: mTLS renewal.
    pub async fn connect_as(&self, cert: &IssuedCertificate, key: &WorkloadKey) -> CaClient {
        CaClient::connect_with_client_cert(
            self.signer.grpc_addr(),
            self.signer.roots_pem(),
            "localhost",
            &cert.chain_pem(),
            &key.private_key_pem(),
        )
        .await
        .unwrap()
    }

    pub async fn metrics(&self) -> String {
        http_get(self.signer.admin_addr(), "/metrics").await.1
    }
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Assert a refusal has `code` and its message contains `needle`.
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    code: Code,
    needle: &str,
) {
    match result {
        Err(ClientError::Status(s)) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                s.message()
            );
        }
        other => panic!("expected {code:?} refusal mentioning {needle:?}, got {other:?}"),
    }
}

/// Verify `cert` chains to its roots with webpki for both client and server
/// auth, at time `at`.
pub fn webpki_verify(cert: &IssuedCertificate, at: UnixTime) {
    let anchors: Vec<_> = cert
        .roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&cert.leaf).unwrap();
    let intermediates: Vec<CertificateDer<'_>> = cert.intermediates.clone();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            at,
            usage,
            None,
            None,
        )
        .unwrap();
    }
}
