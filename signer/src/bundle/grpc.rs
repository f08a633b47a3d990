//! `meshward.v1.TrustBundleService/WatchBundle`: the current bundle at once,
//! then every change, on one server stream per client.

use std::pin::Pin;
use std::sync::Arc;

use meshward_proto::meshward::v1 as pb;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{BundleChannel, TrustBundle};

/// At most `bundle.max_watchers` `WatchBundle` streams at once. A stream
/// lives as long as its client keeps it, and each holds a task, a channel
/// and the bundles queued for a client that does not read; bounded only by
/// connections × streams per connection, one client could open hundreds of
/// thousands of them.
#[derive(Debug)]
pub struct Watchers {
    slots: Arc<Semaphore>,
    max: usize,
    open: Gauge,
    refused: Counter,
}

impl Watchers {
    /// Room for `max` streams.
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open: Gauge::default(),
            refused: Counter::default(),
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
    }

    /// A place for one more stream, or `None` (counted) when all are taken.
    fn admit(&self) -> Option<Watching> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.refused.inc();
            return None;
        };
        self.open.inc();
        Some(Watching {
            _permit: permit,
            open: self.open.clone(),
        })
    }
}

/// One open stream's place in [`Watchers`], given back when its forwarding
/// task ends.
struct Watching {
    _permit: OwnedSemaphorePermit,
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
        let want = request.into_inner().trust_domain;
        let current = self.channel.current();
        if !want.is_empty() && want != current.trust_domain() {
            return Err(Status::not_found(format!(
                "this signer serves trust domain {:?}, not {want:?}",
                current.trust_domain()
            )));
        }
        let watching = match &self.watchers {
            Some(w) => match w.admit() {
                Some(place) => Some(place),
                None => {
                    tracing::warn!(
                        max_watchers = w.max,
                        "WatchBundle refused: every watcher place is taken (bundle.max_watchers)"
                    );
                    return Err(Status::resource_exhausted(
                        "too many WatchBundle streams are open; retry with backoff",
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
