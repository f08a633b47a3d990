//! Callers: an app sending plaintext HTTP through its own sidecar's
//! outbound listener, a plaintext peer, and a workload speaking mTLS
//! straight at a sidecar's inbound listener with a certificate from the
//! signer (what a compromised pod with a stolen key, or a proxy-less
//! client, would do).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshward_signer::client::CaClient;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::agent::{CaAccess, Identity, Workload, issue};
use crate::mesh::MeshResponse;
use crate::mesh::tls::{self, CurrentCert};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Plaintext HTTP/1.1 to `addr` with `Host: host` (an app calling its
/// sidecar's outbound listener, or a plaintext peer).
pub async fn http(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<MeshResponse> {
    let tcp = TcpStream::connect(addr).await?;
    send(tcp, host, method, path, headers).await
}

async fn send<S>(
    stream: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<MeshResponse>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let response = sender
            .send_request(builder.body(Full::new(Bytes::new()))?)
            .await?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response.into_body().collect().await?.to_bytes().to_vec();
        driver.abort();
        anyhow::Ok(MeshResponse {
            status,
            headers,
            body,
            client_cert: None,
        })
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .context("request timed out")?
}

/// A workload with its own certificate from the signer, dialling mTLS
/// itself.
pub struct MtlsClient {
    identity: Identity,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for MtlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsClient").finish_non_exhaustive()
    }
}

impl MtlsClient {
    /// Gets a certificate for `workload` and trusts the signer's roots;
    /// the server must present `server_id` (any mesh identity when `None`).
    pub async fn issue(
        ca: &CaAccess,
        workload: &Workload,
        server_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let client = CaClient::connect(ca.grpc, &ca.roots_pem, "localhost").await?;
        let identity = issue(&client, &ca.tokens, workload).await?;
        Self::with_identity(identity, &ca.roots_pem, server_id)
    }

    /// Uses `identity`, trusting `roots_pem`.
    pub fn with_identity(
        identity: Identity,
        roots_pem: &str,
        server_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let cert = Arc::new(CurrentCert::default());
        cert.set(identity.certified.clone());
        let roots = Arc::new(tls::root_store(roots_pem)?);
        let config = tls::client_config(roots, cert, server_id.map(str::to_owned))?;
        Ok(Self {
            identity,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The certificate it presents.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A TLS connection to `addr` (the handshake done).
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost")?;
        let tls = tokio::time::timeout(IO_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .context("TLS handshake timed out")??;
        Ok(tls)
    }

    /// One HTTP/1.1 request over a new mTLS connection.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<MeshResponse> {
        let tls = self.connect(addr).await?;
        let mut r = send(tls, "backend.shop", method, path, headers).await?;
        r.client_cert = crate::mesh::CertInfo::parse(&self.identity.leaf, 1).ok();
        Ok(r)
    }
}
