//! `meshward.v1.TrustBundleService/WatchBundle`: the current bundle at once,
//! then every change, on one server stream per client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use meshward_proto::meshward::v1 as pb;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{BundleChannel, TrustBundle};

/// At most `bundle.max_watchers` `WatchBundle` streams at once, and at most
/// `bundle.max_watchers_per_ip` from one address. A stream lives as long as
/// its client keeps it, and each holds a task, a channel and the bundles
/// queued for a client that does not read; bounded only by connections ×
/// streams per connection, one client could open hundreds of thousands of
/// them — and with the global bound alone, one pod could still hold every
/// place and lock every other consumer out.
#[derive(Debug)]
pub struct Watchers {
    slots: Arc<Semaphore>,
    max: usize,
    per_ip: Option<usize>,
    by_ip: StreamsByAddress,
    open: Gauge,
    refused: Counter,
    refused_per_ip: Counter,
}

/// Open streams per client address.
type StreamsByAddress = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Why a stream was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Every place is taken.
    Full,
    /// The client's address holds its share.
    AddressShare,
}

impl Watchers {
    /// Room for `max` streams, any number from one address.
    pub fn new(max: usize) -> Self {
        Self::with_per_ip(max, None)
    }

    /// Room for `max` streams, at most `per_ip` of them from one address.
    pub fn with_per_ip(max: usize, per_ip: Option<usize>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            per_ip: per_ip.map(|n| n.max(1)),
            by_ip: Arc::default(),
            open: Gauge::default(),
            refused: Counter::default(),
            refused_per_ip: Counter::default(),
        }
    }

    /// `meshward_signer_bundle_watchers{,_max}` and
    /// `meshward_signer_bundle_watchers_refused_total`.
    pub fn register(&self, registry: &mut Registry) {
        let max = Gauge::<i64>::default();
        max.set(i64::try_from(self.max).unwrap_or(i64::MAX));
        registry.register(
            "bundle_watchers",
            "WatchBundle streams open",
            self.open.clone(),
        );
        registry.register(
            "bundle_watchers_max",
            "WatchBundle streams allowed at once (bundle.max_watchers)",
            max,
        );
        registry.register(
            "bundle_watchers_refused",
            "WatchBundle streams refused because bundle.max_watchers were open",
            self.refused.clone(),
        );
        registry.register(
            "bundle_watchers_refused_per_address",
            "WatchBundle streams refused because their address held bundle.max_watchers_per_ip",
            self.refused_per_ip.clone(),
        );
    }

    /// A place for one more stream from `peer`, or why not (counted).
    fn admit(&self, peer: Option<IpAddr>) -> Result<Watching, Refusal> {
        // The address's share first: a refused stream takes no global place.
        let address = match (self.per_ip, peer) {
            (Some(share), Some(ip)) => {
                let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
                let held = by_ip.entry(ip).or_insert(0);
                if *held >= share {
                    drop(by_ip);
                    self.refused_per_ip.inc();
                    return Err(Refusal::AddressShare);
                }
                *held += 1;
                Some((ip, self.by_ip.clone()))
            }
            _ => None,
        };
        let share = AddressShare(address);
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.refused.inc();
            return Err(Refusal::Full);
        };
        self.open.inc();
        Ok(Watching {
            _permit: permit,
            _share: share,
            open: self.open.clone(),
        })
    }
}

/// A stream's count against its address, given back on drop.
struct AddressShare(Option<(IpAddr, StreamsByAddress)>);

impl Drop for AddressShare {
    fn drop(&mut self) {
        if let Some((ip, by_ip)) = self.0.take() {
            let mut by_ip = by_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = by_ip.get_mut(&ip) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
    }
}

/// One open stream's place in [`Watchers`], given back when its forwarding
/// task ends.
struct Watching {
    _permit: OwnedSemaphorePermit,
    _share: AddressShare,
    open: Gauge,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The gRPC service; add it to a tonic router with
/// `TrustBundleServiceServer::new(WatchBundleService::new(channel))`.
#[derive(Debug, Clone)]
pub struct WatchBundleService {
    channel: BundleChannel,
    shutdown: Option<watch::Receiver<bool>>,
    watchers: Option<Arc<Watchers>>,
}

impl WatchBundleService {
    /// Serve bundles from `channel`.
    pub fn new(channel: BundleChannel) -> Self {
        Self {
            channel,
            shutdown: None,
            watchers: None,
        }
    }

    /// At most `watchers`' room of streams at once; beyond it a new stream
    /// is refused RESOURCE_EXHAUSTED.
    pub fn with_watchers(mut self, watchers: Arc<Watchers>) -> Self {
        self.watchers = Some(watchers);
        self
    }

    /// End every open stream when `shutdown` turns true (a server's graceful
    /// shutdown waits for open streams, which would otherwise never end).
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::trust_bundle_service_server::TrustBundleServiceServer<Self> {
        pb::trust_bundle_service_server::TrustBundleServiceServer::new(self)
    }
}

/// The wire form of a bundle.
pub fn to_proto(b: &TrustBundle) -> pb::TrustBundle {
    pb::TrustBundle {
        trust_domain: b.trust_domain().to_string(),
        roots_der: b.roots().iter().map(|c| c.to_vec()).collect(),
        roots_pem: b.roots_pem(),
        sequence: b.sequence(),
        refresh_hint: Some(prost_types::Duration {
            seconds: i64::try_from(b.refresh_hint().as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        }),
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl pb::trust_bundle_service_server::TrustBundleService for WatchBundleService {
    type WatchBundleStream = BundleStream;

    async fn watch_bundle(
        &self,
        request: Request<pb::WatchBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let want = request.into_inner().trust_domain;
        let current = self.channel.current();
        if !want.is_empty() && want != current.trust_domain() {
            return Err(Status::not_found(format!(
                "this signer serves trust domain {:?}, not {want:?}",
                current.trust_domain()
            )));
        }
        let watching = match &self.watchers {
            Some(w) => match w.admit(peer) {
                Ok(place) => Some(place),
                Err(Refusal::Full) => {
                    tracing::warn!(
                        max_watchers = w.max,
                        "WatchBundle refused: every watcher place is taken (bundle.max_watchers)"
                    );
                    return Err(Status::resource_exhausted(
                        "too many WatchBundle streams are open; retry with backoff",
                    ));
                }
                Err(Refusal::AddressShare) => {
                    tracing::debug!(
                        peer = ?peer,
                        max_per_address = ?w.per_ip,
                        "WatchBundle refused: this address holds its share (bundle.max_watchers_per_ip)"
                    );
                    return Err(Status::resource_exhausted(
                        "this address has too many WatchBundle streams open \
                         (bundle.max_watchers_per_ip); close one or retry with backoff",
                    ));
                }
            },
            None => None,
        };
        let rx = self.channel.subscribe();
        let (tx, out) = mpsc::channel(4);
        let (_keep, never) = watch::channel(false);
        let shutdown = self.shutdown.clone().unwrap_or(never);
        tokio::spawn(async move {
            let _keep = _keep;
            // Held until the client goes away (or shutdown).
            let _watching = watching;
            forward(rx, tx, shutdown).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

/// Send the current bundle, then each new one, until the client goes away
/// or the channel closes. A slow client skips intermediate bundles (it only
/// ever needs the latest) but never sees the sequence go back.
async fn forward(
    mut rx: watch::Receiver<Arc<TrustBundle>>,
    tx: mpsc::Sender<Result<pb::TrustBundle, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let bundle = rx.borrow_and_update().clone();
        if tx.send(Ok(to_proto(&bundle))).await.is_err() {
            return;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
