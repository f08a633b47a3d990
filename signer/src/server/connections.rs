//! Bounds on the gRPC port's connections, so that connections alone — which
//! need no credentials: a token is only checked per request — cannot take the
//! signer's memory or its ability to accept agents.
//!
//! - **`server.max_connections`**: the accept loop takes a slot before it
//!   accepts; with every slot held it stops accepting, and new connections
//!   wait in the kernel's listen backlog (then at SYN) instead of each
//!   costing the signer ~35 KiB (TLS and HTTP/2 state; measured by the
//!   benchmark's mass restart). A slot is held from `accept` (handshake
//!   included) until the connection is dropped.
//! - **`server.max_connection_age`** (+ `max_connection_age_grace`): tonic
//!   sends GOAWAY at the age; an agent's idle connection then closes, and a
//!   connection still busy after the grace — a `WatchBundle` stream, or a
//!   peer that ignores GOAWAY — is closed here, so a slot is never held for
//!   good.
//!
//! Dead peers (gone without a FIN) are found by HTTP/2 keepalive pings
//! (`server.keepalive_interval` / `keepalive_timeout`), set on the tonic
//! server.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;
use tracing::warn;

/// How often at most an accept loop logs that every connection slot is taken.
const LIMIT_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// An accept loop bounded by a [`ConnectionLimit`]: it takes a slot before
/// each `accept`, so at the limit connections wait in the listen backlog.
#[derive(Debug)]
pub struct BoundedAccept {
    listener: TcpListener,
    limit: ConnectionLimit,
    /// For the log: `gRPC`, `bundle endpoint`.
    what: &'static str,
    /// The setting that bounds it, for the log.
    setting: &'static str,
    last_warned: Option<Instant>,
}

impl BoundedAccept {
    /// Accept from `listener` within `limit`.
    pub fn new(
        listener: TcpListener,
        limit: ConnectionLimit,
        what: &'static str,
        setting: &'static str,
    ) -> Self {
        Self {
            listener,
            limit,
            what,
            setting,
            last_warned: None,
        }
    }

    /// The next connection with its slot (Nagle off), or `None` once
    /// `shutdown` is true. A failed `accept` is logged, then retried after a
    /// short pause.
    pub async fn next(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(TcpStream, std::net::SocketAddr, Slot)> {
        loop {
            let reserved = match self.limit.try_reserve() {
                Some(r) => r,
                None => {
                    if self
                        .last_warned
                        .is_none_or(|t| t.elapsed() >= LIMIT_WARN_INTERVAL)
                    {
                        warn!(
                            port = self.what,
                            max_connections = self.limit.max(),
                            setting = self.setting,
                            "every connection slot is taken; new connections wait in the \
                             listen backlog until one closes"
                        );
                        self.last_warned = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = shutdown.wait_for(|stop| *stop) => return None,
                        r = self.limit.wait_to_reserve() => r?,
                    }
                }
            };
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return None,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Without this every unary response waits for the peer's
                    // delayed ACK (~40 ms).
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
                    }
                    return Some((tcp, peer, reserved.accepted()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little
                    // instead of spinning on accept.
                    warn!(port = self.what, error = %e, "accept failed");
                    drop(reserved);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }
}

/// The connection slots of one listener, and their metrics.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    open: Gauge,
    limit: Gauge,
    waits: Counter,
    forced_closes: Counter,
    /// Connections are closed this long after they were accepted, if still
    /// open (`max_connection_age` + grace); `None`: never.
    lifetime: Option<Duration>,
}

impl ConnectionLimit {
    /// At most `max` connections at once (≥ 1), each closed `lifetime` after
    /// its accept.
    pub fn new(max: usize, lifetime: Option<Duration>) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        let limit = Gauge::default();
        limit.set(i64::try_from(max).unwrap_or(i64::MAX));
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open: Gauge::default(),
            limit,
            waits: Counter::default(),
            forced_closes: Counter::default(),
            lifetime,
        }
    }

    /// Register the metrics into the signer's registry as
    /// `<port>_connections`, `<port>_connections_max`,
    /// `<port>_connection_limit_waits` and `<port>_connections_closed_at_max_age`
    /// (`port`: `grpc`, `bundle_endpoint`).
    pub fn register(&self, registry: &mut Registry, port: &str) {
        registry.register(
            format!("{port}_connections"),
            "Connections open on this port (TLS handshakes included)",
            self.open.clone(),
        );
        registry.register(
            format!("{port}_connections_max"),
            "The accept loop stops accepting at this many open connections",
            self.limit.clone(),
        );
        registry.register(
            format!("{port}_connection_limit_waits"),
            "Times the accept loop found every connection slot taken and waited for one",
            self.waits.clone(),
        );
        registry.register(
            format!("{port}_connections_closed_at_max_age"),
            "Connections still open at their maximum age (+ grace), closed by the signer",
            self.forced_closes.clone(),
        );
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for the next connection, at once, if one is free.
    pub fn try_reserve(&self) -> Option<Reserved> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Reserved {
            permit,
            limit: self.clone(),
        })
    }

    /// Wait for a slot (counted as a wait). `None` only if the semaphore was
    /// closed, which this type never does.
    pub async fn wait_to_reserve(&self) -> Option<Reserved> {
        self.waits.inc();
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(Reserved {
            permit,
            limit: self.clone(),
        })
    }
}

/// A slot the accept loop holds while it waits for the connection to put in
/// it (not counted as open until then).
#[derive(Debug)]
pub struct Reserved {
    permit: OwnedSemaphorePermit,
    limit: ConnectionLimit,
}

impl Reserved {
    /// A connection was accepted into this slot: it counts as open, and its
    /// lifetime starts.
    pub fn accepted(self) -> Slot {
        let l = self.limit;
        l.open.inc();
        Slot {
            _permit: self.permit,
            open: l.open,
            forced_closes: l.forced_closes,
            deadline: l.lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
            expired: false,
        }
    }
}

/// One taken connection slot: freed (and the open gauge lowered) on drop.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
    forced_closes: Counter,
    deadline: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Slot {
    /// Ready with an error once the connection has outlived its lifetime.
    /// Once ready, it stays ready: every later read and write fails too.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        if !self.expired {
            let due = self
                .deadline
                .as_mut()
                .is_some_and(|d| d.as_mut().poll(cx).is_ready());
            if !due {
                return Poll::Pending;
            }
            self.expired = true;
            self.forced_closes.inc();
        }
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connection outlived server.max_connection_age + grace",
        ))
    }
}

/// A connection holding its slot; reads and writes fail once it has outlived
/// its lifetime, which makes hyper close it.
#[derive(Debug)]
pub struct Limited<S> {
    inner: S,
    slot: Slot,
}

impl<S> Limited<S> {
    /// `inner` holding `slot`.
    pub fn new(inner: S, slot: Slot) -> Self {
        Self { inner, slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Poll::Ready(e) = self.slot.poll_expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(e) = self.slot.poll_expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(e) = self.slot.poll_expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;

    /// The inner stream's (TLS peer certificates, addresses), so
    /// `Request::peer_certs` works as without the limit.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn slots_run_out_at_the_maximum_and_come_back_on_drop() {
        let limit = ConnectionLimit::new(2, None);
        let a = limit.try_reserve().expect("first").accepted();
        let reserved = limit.try_reserve().expect("second");
        assert!(limit.try_reserve().is_none(), "a third slot beyond max 2");
        assert_eq!(
            limit.open.get(),
            1,
            "a reserved slot is not an open connection"
        );
        let _b = reserved.accepted();
        assert_eq!(limit.open.get(), 2);
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move {
                limit
                    .wait_to_reserve()
                    .await
                    .map(Reserved::accepted)
                    .is_some()
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "waits while both slots are held");
        drop(a);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the freed slot goes to the waiter")
                .unwrap()
        );
        assert_eq!(limit.waits.get(), 1);
        assert_eq!(
            limit.open.get(),
            1,
            "the waiter's slot dropped with its task"
        );
    }

    #[tokio::test]
    async fn a_connection_past_its_lifetime_fails_its_reads_and_writes() {
        let limit = ConnectionLimit::new(1, Some(Duration::from_secs(1)));
        let (near, mut far) = tokio::io::duplex(64);
        let mut conn = Limited::new(near, limit.try_reserve().unwrap().accepted());
        far.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let err = conn.write_all(b"late").await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(limit.forced_closes.get(), 1, "counted once per connection");
        drop(conn);
        assert_eq!(limit.open.get(), 0);
        assert!(limit.try_reserve().is_some(), "the slot is free again");
    }
}
