//! Bounds on the gRPC port's (and the HTTPS bundle endpoint's) connections, so that connections alone — which
//! need no credentials: a token is only checked per request — cannot take the
//! signer's memory or its ability to accept agents.
//!
//! - **`server.max_connections`**: the accept loop takes a slot before it
//!   accepts; with every slot held it stops accepting, and new connections
//!   wait in the kernel's listen backlog (then at SYN) instead of each
//!   costing the signer ~35 KiB (TLS and HTTP/2 state; measured by the
//!   benchmark's mass restart). A slot is held from `accept` (handshake
//!   included) until the connection is dropped.
//! - **`server.max_connections_per_ip`**: an address already holding its
//!   share has further connections closed at accept (the slot stays free),
//!   so one client cannot take every slot and lock the others out.
//! - **`server.max_connection_age`** (+ `max_connection_age_grace`): tonic
//!   sends GOAWAY at the age; an agent's idle connection then closes, and a
//!   connection still busy after the grace — a `WatchBundle` stream, or a
//!   peer that ignores GOAWAY — is closed here, so a slot is never held for
//!   good.
//!
//! Dead peers (gone without a FIN) are found by HTTP/2 keepalive pings
//! (`server.keepalive_interval` / `keepalive_timeout`), set on the tonic
//! server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

/// Open connections per peer address.
type ByAddress = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// How often at most an accept loop logs that every connection slot is taken.
const LIMIT_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// At most this many backlog connections are taken at shutdown (the listen
/// backlog is 1024 by default).
const BACKLOG_DRAIN_MAX: usize = 4096;

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
    last_warned_per_ip: Option<Instant>,
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
            last_warned_per_ip: None,
        }
    }

    /// The next connection with its slot (Nagle off), or `None` once
    /// `shutdown` is true. A failed `accept` is logged, then retried after a
    /// short pause.
    pub async fn next(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(TcpStream, std::net::SocketAddr, Slot)> {
        let mut reserved: Option<Reserved> = None;
        loop {
            let slot = match reserved.take() {
                Some(r) => r,
                None => self.reserve(shutdown).await?,
            };
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return None,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => match slot.accepted(peer.ip()) {
                    Ok(slot) => {
                        // Without this every unary response waits for the
                        // peer's delayed ACK (~40 ms).
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
                        }
                        return Some((tcp, peer, slot));
                    }
                    Err(unused) => {
                        // That address holds its share: close this one at
                        // once and keep the slot for the next connection.
                        drop(tcp);
                        if self
                            .last_warned_per_ip
                            .is_none_or(|t| t.elapsed() >= LIMIT_WARN_INTERVAL)
                        {
                            warn!(
                                port = self.what,
                                peer = %peer.ip(),
                                max_per_address = ?self.limit.per_ip,
                                "an address opened more connections than it may hold; closing \
                                 the excess (max_connections_per_ip)"
                            );
                            self.last_warned_per_ip = Some(Instant::now());
                        }
                        reserved = Some(unused);
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off a little
                    // instead of spinning on accept.
                    warn!(port = self.what, error = %e, "accept failed");
                    drop(slot);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }

    /// At shutdown: close the listening socket, first taking every
    /// connection the kernel already completed in its backlog (they would be
    /// reset when it closes). The caller closes them cleanly; a connection
    /// arriving between the last accept and the close is the only one left
    /// to the kernel.
    pub fn close_taking_backlog(self) -> Vec<TcpStream> {
        let mut taken = Vec::new();
        let listener = match self.listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(port = self.what, error = %e, "listener not detached; backlog left to the kernel");
                return taken;
            }
        };
        // Bounded: a flood arriving while this runs must not keep it here.
        for _ in 0..BACKLOG_DRAIN_MAX {
            match listener.accept() {
                Ok((tcp, _)) => {
                    let tcp = tcp
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(tcp));
                    if let Ok(tcp) = tcp {
                        taken.push(tcp);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        drop(listener);
        taken
    }

    /// A free slot, waiting (and saying so, now and then) when there is none.
    async fn reserve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<Reserved> {
        if let Some(r) = self.limit.try_reserve() {
            return Some(r);
        }
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
            _ = shutdown.wait_for(|stop| *stop) => None,
            r = self.limit.wait_to_reserve() => r,
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
    refused_per_ip: Counter,
    /// Connections are closed this long after they were accepted, if still
    /// open (`max_connection_age` + grace); `None`: never.
    lifetime: Option<Duration>,
    /// At most this many open connections from one address; `None`: any.
    per_ip: Option<usize>,
    by_ip: ByAddress,
}

impl ConnectionLimit {
    /// At most `max` connections at once (≥ 1), each closed `lifetime` after
    /// its accept.
    pub fn new(max: usize, lifetime: Option<Duration>) -> Self {
        Self::with_per_ip(max, lifetime, None)
    }

    /// [`ConnectionLimit::new`], and at most `per_ip` connections from one
    /// address: a single client (a compromised pod) cannot take every slot
    /// and lock the others out.
    pub fn with_per_ip(max: usize, lifetime: Option<Duration>, per_ip: Option<usize>) -> Self {
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
            refused_per_ip: Counter::default(),
            lifetime,
            per_ip: per_ip.map(|n| n.max(1)),
            by_ip: Arc::new(Mutex::new(HashMap::new())),
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
            format!("{port}_connections_refused_per_address"),
            "Connections closed at accept because their address already held its maximum",
            self.refused_per_ip.clone(),
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
    /// A connection from `peer` was accepted into this slot: it counts as
    /// open, and its lifetime starts — unless `peer` already holds its
    /// maximum, then the slot comes back unused.
    pub fn accepted(self, peer: IpAddr) -> Result<Slot, Reserved> {
        let peer = peer.to_canonical();
        if let Some(max) = self.limit.per_ip {
            let mut by_ip = self
                .limit
                .by_ip
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let held = by_ip.entry(peer).or_insert(0);
            if *held >= max {
                drop(by_ip);
                self.limit.refused_per_ip.inc();
                return Err(self);
            }
            *held += 1;
        }
        let l = self.limit;
        l.open.inc();
        Ok(Slot {
            _permit: self.permit,
            open: l.open,
            forced_closes: l.forced_closes,
            deadline: l.lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
            expired: false,
            address: l.per_ip.map(|_| (peer, l.by_ip.clone())),
        })
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
    /// The peer's address and the per-address counts, when they are kept.
    address: Option<(IpAddr, ByAddress)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
        if let Some((ip, by_ip)) = &self.address {
            let mut by_ip = by_ip
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(held) = by_ip.get_mut(ip) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    by_ip.remove(ip);
                }
            }
        }
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

    /// The stream and its slot, apart.
    pub fn into_parts(self) -> (S, Slot) {
        (self.inner, self.slot)
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

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn one_address_holds_at_most_its_share_and_gets_it_back_on_close() {
        let limit = ConnectionLimit::with_per_ip(10, None, Some(2));
        let other: IpAddr = "10.0.0.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let a = limit.try_reserve().unwrap().accepted(LOCAL).unwrap();
        // The same address written as IPv4-mapped IPv6 is the same address.
        let _b = limit.try_reserve().unwrap().accepted(mapped).unwrap();
        let unused = limit
            .try_reserve()
            .unwrap()
            .accepted(LOCAL)
            .expect_err("a third connection from 127.0.0.1");
        assert_eq!(limit.refused_per_ip.get(), 1);
        // The slot it would have used serves another address.
        let _c = unused.accepted(other).unwrap();
        assert_eq!(limit.open.get(), 3);
        drop(a);
        let _d = limit.try_reserve().unwrap().accepted(LOCAL).unwrap();
    }

    #[tokio::test]
    async fn slots_run_out_at_the_maximum_and_come_back_on_drop() {
        let limit = ConnectionLimit::new(2, None);
        let a = limit.try_reserve().expect("first").accepted(LOCAL).unwrap();
        let reserved = limit.try_reserve().expect("second");
        assert!(limit.try_reserve().is_none(), "a third slot beyond max 2");
        assert_eq!(
            limit.open.get(),
            1,
            "a reserved slot is not an open connection"
        );
        let _b = reserved.accepted(LOCAL).unwrap();
        assert_eq!(limit.open.get(), 2);
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move {
                limit
                    .wait_to_reserve()
                    .await
                    .is_some_and(|r| r.accepted(LOCAL).is_ok())
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
        let mut conn = Limited::new(near, limit.try_reserve().unwrap().accepted(LOCAL).unwrap());
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
