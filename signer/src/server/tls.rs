//! TLS for the gRPC port, done here rather than by tonic so client
//! certificates (mTLS renewal) are handled the signer's way:
//!
//! - client certificates are optional (JWT callers send none);
//! - at the TLS level a client certificate only has to parse and its holder
//!   has to prove possession of the key (rustls checks the
//!   CertificateVerify signature); whether the chain leads to one of the
//!   signer's *current* roots (they change during a root rotation), is
//!   unexpired and carries a workload identity is decided per request by
//!   [`crate::authn::client_cert::ClientCertAuthenticator`], which refuses
//!   with an UNAUTHENTICATED status that says why;
//! - handshakes run concurrently, each with a timeout, so a slow client
//!   cannot stall the accept loop;
//! - at most `server.max_connections` connections at once
//!   ([`super::connections`]).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::ResolvesServerCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::connections::{BoundedAccept, ConnectionLimit, Limited};

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection found in the listen backlog at shutdown may take to
/// finish its handshake before it is dropped.
const BACKLOG_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key does not parse.
    #[error("serving identity: {0}")]
    Identity(String),
    /// rustls refused the configuration.
    #[error("rustls: {0}")]
    Rustls(String),
}

/// Client-certificate verifier: optional client auth; the certificate must
/// parse and its key must sign the handshake; the chain is judged per
/// request.
#[derive(Debug)]
struct RenewalVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for RenewalVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Parse a serving chain (leaf first, PEM) and its PKCS#8 key (PEM) into a
/// rustls certified key, checking that the key matches the leaf.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(chain_pem)
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Identity("no certificate in the chain".into()));
    }
    let key_der = pem::parse(key_pem).map_err(|e| TlsError::Identity(e.to_string()))?;
    let key = PrivateKeyDer::try_from(key_der.into_contents())
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    Ok(certified)
}

/// The rustls server configuration: the serving certificate comes from
/// `certs` on every handshake (so it can be replaced while serving),
/// optional client certificates (judged per request), ALPN h2.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = RenewalVerifier {
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accept TCP connections while `limit` has a free slot, handshake each in
/// its own task, and yield the TLS streams (each holding its slot) until
/// `shutdown` turns true.
/// TLS close_notify and FIN, then read and discard what the client had
/// sent (briefly) so the close is not turned into a reset.
async fn close_unserved(mut stream: TlsStream<TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// A handshaken connection on its way to the gRPC server.
type Handshaken = Result<Limited<TlsStream<TcpStream>>, std::io::Error>;

/// The connections [`tls_incoming`] hands to the server. After shutdown the
/// server stops taking them; [`drain_unserved`] closes those left cleanly.
pub struct Incoming(Arc<std::sync::Mutex<mpsc::Receiver<Handshaken>>>);

impl tokio_stream::Stream for Incoming {
    type Item = Handshaken;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.0.lock() {
            Ok(mut rx) => rx.poll_recv(cx),
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

/// Once shutdown began, closes (without a reset) every connection that
/// was handshaken but not taken by the server, until the accept side ends.
async fn drain_unserved(
    rx: Arc<std::sync::Mutex<mpsc::Receiver<Handshaken>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = shutdown.wait_for(|stop| *stop).await;
    // Let the server take what it polled before it saw the signal.
    tokio::time::sleep(Duration::from_millis(50)).await;
    loop {
        let next = match rx.lock() {
            Ok(mut rx) => rx.try_recv(),
            Err(_) => return,
        };
        match next {
            Ok(Ok(stream)) => {
                let (tls, _slot) = stream.into_parts();
                tokio::spawn(close_unserved(tls));
            }
            Ok(Err(_)) => {}
            Err(mpsc::error::TryRecvError::Empty) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return,
        }
    }
}

pub fn tls_incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    limit: ConnectionLimit,
    mut shutdown: watch::Receiver<bool>,
) -> Incoming {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    let rx = Arc::new(std::sync::Mutex::new(rx));
    tokio::spawn(drain_unserved(rx.clone(), shutdown.clone()));
    let mut accept = BoundedAccept::new(listener, limit, "gRPC", "server.max_connections");
    tokio::spawn(async move {
        while let Some((tcp, peer, slot)) = accept.next(&mut shutdown).await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let stopping = shutdown.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    // A handshake that ends after shutdown began: the
                    // server takes no new connection any more, and dropping
                    // this one with the client's request unread would make
                    // the kernel send a reset. Close it cleanly instead: the
                    // client sees the connection end before any answer and
                    // retries elsewhere (UNAVAILABLE), its request unserved.
                    Ok(Ok(stream)) if *stopping.borrow() => close_unserved(stream).await,
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Limited::new(stream, slot))).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
        // Stopping: connections the kernel completed but nobody accepted yet
        // would be reset when the listener closes. Take them, finish their
        // handshake and close them cleanly, as those above.
        let backlog = accept.close_taking_backlog();
        if !backlog.is_empty() {
            debug!(
                connections = backlog.len(),
                "closing the listen backlog cleanly"
            );
        }
        for tcp in backlog {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(BACKLOG_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    close_unserved(stream).await;
                }
            });
        }
    });
    Incoming(rx)
}
