//! Drives a [`Plugin`] on tokio: performs the HTTP calls it dispatches
//! against real servers and resumes paused streams, runs its timer.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::{
    ConnOutcome, ContextId, HostError, HttpCallRequest, HttpCallResponse, HttpOutcome, Plugin,
    Properties,
};

/// How many rounds of callouts one stream may go through before the host
/// gives up on it (fail closed).
const MAX_CALLOUT_ROUNDS: usize = 8;

/// A plugin instance shared by the tasks of one proxy. Calls into the guest
/// are short and synchronous; the lock is never held across an await.
#[derive(Clone, Debug)]
pub struct SharedPlugin {
    inner: Arc<Mutex<Plugin>>,
}

impl SharedPlugin {
    /// Wraps a started plugin.
    pub fn new(plugin: Plugin) -> Self {
        Self {
            inner: Arc::new(Mutex::new(plugin)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Plugin> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Runs `f` with the plugin locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut Plugin) -> R) -> R {
        f(&mut self.lock())
    }

    /// An HTTP request through the plugin, callouts included. The context
    /// stays open: call [`SharedPlugin::finish`] when the exchange is over.
    pub async fn http_request(
        &self,
        props: &Properties,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(ContextId, HttpOutcome), HostError> {
        let (ctx, mut outcome) = self.lock().new_http_request(props, headers, body)?;
        let mut rounds = 0;
        while outcome == HttpOutcome::Paused {
            rounds += 1;
            if rounds > MAX_CALLOUT_ROUNDS || !self.run_pending_calls().await? {
                let _ = self.finish(ctx);
                return Err(HostError::Stalled(ctx));
            }
            outcome = self.lock().http_state(ctx)?;
        }
        Ok((ctx, outcome))
    }

    /// A new connection through the plugin, callouts included. The context
    /// stays open: call [`SharedPlugin::finish_connection`] when it closes.
    pub async fn connection(
        &self,
        props: &Properties,
    ) -> Result<(ContextId, ConnOutcome), HostError> {
        let (ctx, mut outcome) = self.lock().new_connection(props)?;
        let mut rounds = 0;
        while outcome == ConnOutcome::Paused {
            rounds += 1;
            if rounds > MAX_CALLOUT_ROUNDS || !self.run_pending_calls().await? {
                let _ = self.finish_connection(ctx);
                return Err(HostError::Stalled(ctx));
            }
            outcome = self.lock().connection_state(ctx)?;
        }
        Ok((ctx, outcome))
    }

    /// See [`Plugin::http_response`].
    pub fn http_response(
        &self,
        ctx: ContextId,
        headers: &[(String, String)],
    ) -> Result<HttpOutcome, HostError> {
        self.lock().http_response(ctx, headers)
    }

    /// See [`Plugin::finish`].
    pub fn finish(&self, ctx: ContextId) -> Result<(), HostError> {
        self.lock().finish(ctx)
    }

    /// See [`Plugin::finish_connection`].
    pub fn finish_connection(&self, ctx: ContextId) -> Result<(), HostError> {
        self.lock().finish_connection(ctx)
    }

    /// The metrics in Prometheus text format.
    pub fn metrics_prometheus(&self) -> String {
        self.lock().metrics_prometheus()
    }

    /// Performs every HTTP call the plugin has dispatched and delivers the
    /// answers. Returns whether there was any.
    pub async fn run_pending_calls(&self) -> Result<bool, HostError> {
        let calls = self.lock().take_http_calls();
        if calls.is_empty() {
            return Ok(false);
        }
        for call in calls {
            let token = call.token;
            let response = perform(call).await;
            self.lock().deliver_http_call_response(token, response)?;
        }
        Ok(true)
    }

    /// Runs `proxy_on_tick` at the period the plugin set (if any) until the
    /// returned task is aborted.
    pub fn spawn_ticker(&self) -> Option<tokio::task::JoinHandle<()>> {
        let period = self.lock().tick_period_ms();
        if period == 0 {
            return None;
        }
        let this = self.clone();
        Some(tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(u64::from(period)));
            interval.tick().await;
            loop {
                interval.tick().await;
                if let Err(e) = this.lock().tick() {
                    tracing::warn!("plugin tick failed: {e}");
                    return;
                }
                if let Err(e) = this.run_pending_calls().await {
                    tracing::warn!("plugin callout after tick failed: {e}");
                }
            }
        }))
    }
}

/// Performs one HTTP/1.1 call; `None` on any failure or timeout.
pub async fn perform(call: HttpCallRequest) -> Option<HttpCallResponse> {
    let timeout = Duration::from_millis(u64::from(call.timeout_ms.max(1)));
    match tokio::time::timeout(timeout, perform_inner(&call)).await {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::warn!(upstream = %call.upstream, "plugin HTTP call failed: {e:#}");
            None
        }
        Err(_) => {
            tracing::warn!(upstream = %call.upstream, "plugin HTTP call timed out");
            None
        }
    }
}

async fn perform_inner(call: &HttpCallRequest) -> anyhow::Result<HttpCallResponse> {
    let pseudo = |name: &str| {
        call.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let stream = tokio::net::TcpStream::connect(call.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut builder = http::Request::builder()
        .method(pseudo(":method").as_str())
        .uri(pseudo(":path"))
        .header(http::header::HOST, pseudo(":authority"));
    for (k, v) in &call.headers {
        if !k.starts_with(':') {
            builder = builder.header(k.as_str(), v.as_str());
        }
    }
    let request = builder.body(Full::new(Bytes::from(call.body.clone())))?;
    let response = sender.send_request(request).await?;
    let mut headers = vec![(":status".to_owned(), response.status().as_u16().to_string())];
    for (k, v) in response.headers() {
        headers.push((
            k.as_str().to_owned(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ));
    }
    let collected = response.into_body().collect().await?;
    let trailers = collected
        .trailers()
        .map(|t| {
            t.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let body = collected.to_bytes().to_vec();
    driver.abort();
    Ok(HttpCallResponse {
        headers,
        body,
        trailers,
    })
}
