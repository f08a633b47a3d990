//! The application behind a sidecar: answers every request with what it
//! received (method, path, and the identity headers the sidecar set).

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

/// Starts the echo application on `127.0.0.1:0`.
pub async fn spawn_echo(name: &str) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let name = name.clone();
                    async move {
                        let headers: serde_json::Map<String, serde_json::Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    serde_json::Value::String(
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    ),
                                )
                            })
                            .collect();
                        let body = serde_json::json!({
                            "app": name,
                            "method": req.method().as_str(),
                            "path": req.uri().to_string(),
                            "headers": headers,
                        });
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from(body.to_string())));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}
