//! `meshward.v1.TrustBundleService/WatchBundle`: the current bundle at once,
//! then every change, on one server stream per client.

use std::pin::Pin;
use std::sync::Arc;

use meshward_proto::meshward::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{BundleChannel, TrustBundle};

/// The gRPC service; add it to a tonic router with
/// `TrustBundleServiceServer::new(WatchBundleService::new(channel))`.
#[derive(Debug, Clone)]
pub struct WatchBundleService {
    channel: BundleChannel,
    shutdown: Option<watch::Receiver<bool>>,
}

impl WatchBundleService {
    /// Serve bundles from `channel`.
    pub fn new(channel: BundleChannel) -> Self {
        Self {
            channel,
            shutdown: None,
        }
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
        let rx = self.channel.subscribe();
        let (tx, out) = mpsc::channel(4);
        let (_keep, never) = watch::channel(false);
        let shutdown = self.shutdown.clone().unwrap_or(never);
        tokio::spawn(async move {
            let _keep = _keep;
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
