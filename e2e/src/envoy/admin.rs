//! Envoy's admin API over plain HTTP/1.1 on loopback: readiness, the bound
//! listener addresses, stats (the plain `name: value` form and
//! `/stats/prometheus`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One Envoy's admin endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Admin {
    addr: SocketAddr,
}

impl Admin {
    /// The admin API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.call("GET", path).await
    }

    /// `POST path` (e.g. `/logging?wasm=debug`): status and body.
    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.call("POST", path).await
    }

    async fn call(&self, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let fut = async {
            let tcp = TcpStream::connect(self.addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            let driver = tokio::spawn(conn);
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, self.addr.to_string())
                .body(Full::new(Bytes::new()))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            driver.abort();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .with_context(|| format!("envoy admin {method} {path}: timed out"))?
            .with_context(|| format!("envoy admin {method} {path}"))
    }

    /// The bound address of listener `name`, from `/listeners?format=json`.
    pub async fn listener_addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let (status, body) = self.get("/listeners?format=json").await?;
        anyhow::ensure!(status == 200, "/listeners answered {status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let listeners = v
            .get("listener_statuses")
            .and_then(|l| l.as_array())
            .context("/listeners: no listener_statuses")?;
        let l = listeners
            .iter()
            .find(|l| l.get("name").and_then(|n| n.as_str()) == Some(name))
            .with_context(|| format!("no listener {name} in {body}"))?;
        let ip = l
            .pointer("/local_address/socket_address/address")
            .and_then(|a| a.as_str())
            .context("listener address")?;
        let port = l
            .pointer("/local_address/socket_address/port_value")
            .and_then(|p| p.as_u64())
            .context("listener port")?;
        Ok(SocketAddr::new(ip.parse()?, u16::try_from(port)?))
    }

    /// `/stats/prometheus`.
    pub async fn prometheus(&self) -> anyhow::Result<String> {
        let (status, body) = self.get("/stats/prometheus").await?;
        anyhow::ensure!(status == 200, "/stats/prometheus answered {status}");
        Ok(body)
    }

    /// Every counter and gauge as `(name, value)` from `/stats` (names as
    /// Envoy keeps them, before any tag extraction for Prometheus).
    pub async fn stats(&self) -> anyhow::Result<Vec<(String, String)>> {
        let (status, body) = self.get("/stats").await?;
        anyhow::ensure!(status == 200, "/stats answered {status}");
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// The value of counter or gauge `name` (0 when Envoy has none yet).
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self
            .stats()
            .await?
            .into_iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Sum of every counter whose name contains all of `parts`.
    pub async fn stat_sum(&self, parts: &[&str]) -> anyhow::Result<u64> {
        Ok(self
            .stats()
            .await?
            .into_iter()
            .filter(|(k, _)| parts.iter().all(|p| k.contains(p)))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum())
    }
}
