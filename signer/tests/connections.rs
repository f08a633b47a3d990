//! The gRPC port's connection bounds on a running signer: a connection needs
//! no credentials, so connections alone must not be able to take the
//! signer's memory or its accept loop (`server.max_connections`,
//! `max_connection_age` + grace, HTTP/2 keepalive).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::Harness;
use meshward_proto::meshward::v1::WatchBundleRequest;
use meshward_proto::meshward::v1::trust_bundle_service_client::TrustBundleServiceClient;
use meshward_signer::client::CaClient;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A sample of `/metrics` (no labels).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// Assert a new connection from 127.0.0.1 to `addr` (sending `request`, if
/// any) is closed by the signer within `within`, unanswered: an address past
/// its share.
async fn assert_closed_at_accept(addr: std::net::SocketAddr, request: &[u8], within: Duration) {
    let mut excess = tokio::net::TcpStream::connect(addr).await.unwrap();
    if !request.is_empty() {
        let _ = excess.write_all(request).await;
    }
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(within, excess.read(&mut buf))
        .await
        .unwrap_or_else(|_| {
            panic!("the excess connection to {addr} was still open after {within:?}")
        });
    assert!(matches!(closed, Ok(0) | Err(_)), "answered: {closed:?}");
}

/// Assert the counter `name` in `/metrics` text moved (≥ 1).
fn assert_counted(metrics: &str, name: &str) {
    assert!(
        sample(metrics, name).is_some_and(|v| v >= 1.0),
        "{name} did not count: {metrics}"
    );
}

/// Poll `/metrics` (every 50 ms, for at most `within`) until `name` is `want`.
async fn wait_for_sample(h: &Harness, name: &str, want: f64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = h.metrics().await;
        let got = sample(&text, name);
        if got == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got:?}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA client connected within `within`, or `None`.
async fn try_connect(h: &Harness, within: Duration) -> Option<CaClient> {
    tokio::time::timeout(
        within,
        CaClient::connect(h.signer.grpc_addr(), h.signer.roots_pem(), "localhost"),
    )
    .await
    .ok()
    .and_then(Result::ok)
}

/// Attack: open connections (no TLS, no token — nothing is checked before a
/// request) until the signer runs out of memory. At `max_connections` the
/// signer stops accepting: the flood waits in the listen backlog, agents
/// already connected keep being served, and a slot freed is a slot for the
/// next agent.
#[tokio::test]
async fn unauthenticated_connection_flood_waits_in_the_backlog_beyond_max_connections() {
    let h = Harness::start_with(|c| c.server.max_connections = 3).await;
    // The harness's own client holds one slot; two idle TCP connections
    // (they never start TLS) take the rest.
    let addr = h.signer.grpc_addr();
    let mut flood = Vec::new();
    for _ in 0..2 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        3.0,
        Duration::from_secs(10),
    )
    .await;
    // More of the flood: the kernel queues them; the signer does not take them.
    for _ in 0..20 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    assert!(
        try_connect(&h, Duration::from_millis(700)).await.is_none(),
        "an agent got a fourth connection past max_connections = 3"
    );
    let text = h.metrics().await;
    assert_eq!(sample(&text, "meshward_signer_grpc_connections"), Some(3.0));
    assert_eq!(
        sample(&text, "meshward_signer_grpc_connections_max"),
        Some(3.0)
    );
    assert_counted(&text, "meshward_signer_grpc_connection_limit_waits_total");

    // A connected agent is still served.
    h.issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();

    // The flood goes away: its slots come back and a new agent gets one.
    drop(flood);
    let late = try_connect(&h, Duration::from_secs(5))
        .await
        .expect("no connection within 5 s after the flood closed");
    let key = meshward_signer::client::WorkloadKey::generate(
        meshward_signer::client::WorkloadKeyType::EcdsaP256,
    )
    .unwrap();
    late.request_certificate(&key, &harness::id("shop", "late"), &h.opts("shop", "late"))
        .await
        .unwrap();
    h.signer.shutdown().await.unwrap();
}

/// Attack: one client (a compromised pod) opening connections until it
/// holds every slot of `max_connections`, locking every agent out. From one
/// address it gets `max_connections_per_ip`; more are closed at accept, and
/// another address still gets in and is served.
#[tokio::test]
async fn one_address_cannot_take_every_connection_slot() {
    let h = Harness::start_with(|c| {
        c.server.max_connections = 4;
        c.server.max_connections_per_ip = 2;
    })
    .await;
    let addr = h.signer.grpc_addr();
    // The harness's client and one idle connection: 127.0.0.1's share.
    let _held = tokio::net::TcpStream::connect(addr).await.unwrap();
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        2.0,
        Duration::from_secs(10),
    )
    .await;
    // Closed at accept (a handshake that never starts would only time out
    // after 10 s).
    assert_closed_at_accept(addr, b"", Duration::from_secs(5)).await;

    // An agent from another address (127.0.0.2) is accepted and served.
    let other = CaClient::from_channel(h.channel_from(Some("127.0.0.2".parse().unwrap())).await);
    let key = meshward_signer::client::WorkloadKey::generate(
        meshward_signer::client::WorkloadKeyType::EcdsaP256,
    )
    .unwrap();
    other
        .request_certificate(&key, &harness::id("shop", "web"), &h.opts("shop", "web"))
        .await
        .unwrap();
    let text = h.metrics().await;
    assert_eq!(
        sample(&text, "meshward_signer_grpc_connections"),
        Some(3.0),
        "{text}"
    );
    assert_counted(
        &text,
        "meshward_signer_grpc_connections_refused_per_address_total",
    );
    h.signer.shutdown().await.unwrap();
}

/// Attack: hold a slot for good with a stream that never ends (a
/// `WatchBundle` watcher that ignores GOAWAY). At `max_connection_age` the
/// signer sends GOAWAY; after the grace it closes the connection itself.
#[tokio::test]
async fn a_stream_cannot_hold_its_connection_past_max_connection_age_and_grace() {
    let h = Harness::start_with(|c| {
        c.server.max_connection_age = Duration::from_secs(1);
        c.server.max_connection_age_grace = Duration::from_secs(1);
    })
    .await;
    let mut stream = TrustBundleServiceClient::new(h.channel_from(None).await)
        .watch_bundle(WatchBundleRequest {
            trust_domain: "cluster.local".to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap();
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    let started = tokio::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("the watch stream outlived max_connection_age + grace by 13 s");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ended only after {:?}",
        started.elapsed()
    );
    let text = h.metrics().await;
    assert_counted(
        &text,
        "meshward_signer_grpc_connections_closed_at_max_age_total",
    );
    h.signer.shutdown().await.unwrap();
}

/// An agent's idle connection is let go at `max_connection_age` (GOAWAY, no
/// request cut), and the agent's next request simply reconnects.
#[tokio::test]
async fn idle_agent_connections_are_released_at_max_connection_age_and_reconnect() {
    let h = Harness::start_with(|c| {
        c.server.max_connection_age = Duration::from_secs(1);
        c.server.max_connection_age_grace = Duration::from_secs(30);
    })
    .await;
    h.issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        0.0,
        Duration::from_secs(10),
    )
    .await;
    let text = h.metrics().await;
    assert_eq!(
        sample(
            &text,
            "meshward_signer_grpc_connections_closed_at_max_age_total"
        ),
        Some(0.0),
        "an idle connection closes at GOAWAY, not at the grace's end"
    );
    h.issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();
    h.signer.shutdown().await.unwrap();
}

/// A TLS connection to the gRPC port with ALPN h2, nothing sent yet.
async fn tls_h2(h: &Harness) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem::parse_many(h.signer.roots_pem()).unwrap() {
        roots
            .add(rustls_pki_types::CertificateDer::from(cert.into_contents()))
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(h.signer.grpc_addr())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A TLS connection to the gRPC port with ALPN h2 on which only the HTTP/2
/// client preface and an empty SETTINGS frame were sent.
async fn raw_h2(h: &Harness) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = tls_h2(h).await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tls
}

/// Attack: one connection opening thousands of streams at once, each a
/// request the signer buffers (tonic's default is no limit). The signer's
/// first SETTINGS frame caps them at `server.max_concurrent_streams`, which
/// h2 enforces (a stream beyond it is refused).
#[tokio::test]
async fn one_connection_cannot_open_more_streams_than_max_concurrent_streams() {
    let h = Harness::start_with(|c| c.server.max_concurrent_streams = 7).await;
    let mut tls = raw_h2(&h).await;
    // The server's first frame is its SETTINGS: 9-byte header, then 6-byte
    // (id, value) pairs.
    let mut header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(header[3], 0x4, "first frame is SETTINGS: {header:?}");
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; len];
    tls.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS = 0x3.
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
    // Closed first: a graceful shutdown waits for open connections.
    drop(tls);
    h.signer.shutdown().await.unwrap();
}

/// Attack: a peer that ignores GOAWAY (never answers its ping) to hold the
/// signer up when it is told to stop — a rollout waiting on it, or the
/// kubelet killing it mid-write. After `server.shutdown_drain` the signer
/// closes what is left and exits.
#[tokio::test]
async fn a_peer_that_ignores_goaway_cannot_hold_up_shutdown() {
    let h = Harness::start_with(|c| c.server.shutdown_drain = Duration::from_secs(1)).await;
    let tls = raw_h2(&h).await;
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        2.0,
        Duration::from_secs(10),
    )
    .await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), h.signer.shutdown()).await;
    assert!(
        stopped.is_ok(),
        "the signer was still draining 10 s after shutdown (drain 1 s, keepalive 40 s)"
    );
    drop(tls);
}

/// Attack (or a deleted node): a peer that completes TLS and HTTP/2 and then
/// goes silent — it never answers a ping. HTTP/2 keepalive finds it and the
/// signer frees its slot.
#[tokio::test]
async fn a_silent_peer_that_never_answers_pings_is_disconnected_by_keepalive() {
    let h = Harness::start_with(|c| {
        c.server.max_connection_age = Duration::ZERO;
        c.server.keepalive_interval = Duration::from_secs(1);
        c.server.keepalive_timeout = Duration::from_secs(1);
    })
    .await;
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        1.0,
        Duration::from_secs(10),
    )
    .await;

    // The client preface and an empty SETTINGS frame, then silence.
    let mut tls = raw_h2(&h).await;
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        2.0,
        Duration::from_secs(10),
    )
    .await;

    // Read (so the socket sees the close) but never answer: the pings go
    // unacknowledged and the signer hangs up.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the silent peer was still connected after 15 s"
    );
    // The harness's client answers its pings and stays.
    wait_for_sample(
        &h,
        "meshward_signer_grpc_connections",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    h.issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();
    h.signer.shutdown().await.unwrap();
}

/// Attack: streams that declare a large message and then send it slowly.
/// tonic buffers a request's whole body before the handler runs, so an
/// in-flight limit taken in the handler would let every such stream hold
/// its buffer (up to 100 streams × 128 KiB per connection, times every
/// connection) while nothing is refused. The limit is taken when a stream
/// opens: with `max_concurrent_requests = 1`, of two stalled streams the
/// second is refused at once, its body never awaited.
#[tokio::test]
async fn requests_beyond_max_concurrent_requests_are_refused_before_their_bodies_are_buffered() {
    use http_body_util::StreamBody;
    use hyper::body::{Bytes, Frame};

    let h = Harness::start_with(|c| c.server.max_concurrent_requests = 1).await;
    let tls = tls_h2(&h).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    type Chunks = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;
    // A CreateCertificate whose gRPC prefix declares 100 000 bytes, of which
    // 10 arrive; the rest never does (the sender is kept, so the body stays
    // open).
    let stalled = || {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut first = vec![0u8];
        first.extend(100_000u32.to_be_bytes());
        first.extend([0u8; 10]);
        tx.try_send(Ok(Frame::data(Bytes::from(first)))).unwrap();
        let request = http::Request::post(
            "https://localhost/istio.v1.auth.IstioCertificateService/CreateCertificate",
        )
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
        let held: Chunks = tx;
        (held, request)
    };
    let (_a_body, a) = stalled();
    let (_b_body, b) = stalled();
    let mut a = Box::pin(send.send_request(a));
    let mut b = Box::pin(send.send_request(b));
    // Whichever stream was admitted waits for its body; the other is
    // answered without it.
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            r = &mut a => r,
            r = &mut b => r,
        }
    })
    .await
    .expect("a stream beyond the limit is answered without waiting for its body")
    .unwrap();
    assert_eq!(
        answered
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("8"),
        "RESOURCE_EXHAUSTED: {:?}",
        answered.headers()
    );
    let text = h.metrics().await;
    assert!(
        text.contains(r#"meshward_signer_requests_total{outcome="resource_exhausted"} 1"#),
        "{text}"
    );
    drop((a, b, send));
    driver.abort();
    h.signer.shutdown().await.unwrap();
}

/// An HTTP/1.1 GET on the admin port from `local`, answered within
/// `within` (else `None`).
async fn admin_get_from(
    h: &Harness,
    local: std::net::IpAddr,
    path: &str,
    within: Duration,
) -> Option<u16> {
    let client = reqwest::Client::builder()
        .local_address(local)
        .timeout(within)
        .build()
        .unwrap();
    client
        .get(format!("http://{}{path}", h.signer.admin_addr()))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Idle TCP connections to the admin port from `local`, each accepted (it
/// answers a request) before the next is opened.
async fn idle_admin_connections(
    h: &Harness,
    local: std::net::IpAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(local, 0)).unwrap();
        let mut tcp = socket.connect(h.signer.admin_addr()).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: signer\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("admin connection answered")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        held.push(tcp);
    }
    held
}

/// Attack: a pod opening connection after connection to the admin port
/// (which needs no credentials, and which the kubelet's probes use). Its
/// share is `admin_max_connections_per_ip`; the excess is closed at accept,
/// and the probes from another address are still answered.
#[tokio::test]
async fn one_address_cannot_take_the_admin_port_from_the_probes() {
    let h = Harness::start_with(|c| c.server.admin_max_connections_per_ip = 4).await;
    let pod: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let kubelet: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let _held = idle_admin_connections(&h, pod, 4).await;
    // The fifth from the same address is closed without an answer.
    assert_closed_at_accept(
        h.signer.admin_addr(),
        b"GET /healthz HTTP/1.1\r\nhost: signer\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        admin_get_from(&h, kubelet, "/readyz", Duration::from_secs(10)).await,
        Some(200)
    );
    let text = h.signer.metrics().render().unwrap();
    assert_counted(
        &text,
        "meshward_signer_admin_connections_refused_per_address_total",
    );
    drop(_held);
    h.signer.shutdown().await.unwrap();
}

/// Attack: connections from many addresses, each idle. Past
/// `admin_max_connections` the signer stops accepting, so they wait in the
/// backlog and cost it nothing; a slot freed serves the next.
#[tokio::test]
async fn admin_connection_flood_waits_in_the_backlog_beyond_admin_max_connections() {
    let h = Harness::start_with(|c| c.server.admin_max_connections = 4).await;
    let flood: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let probe: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let held = idle_admin_connections(&h, flood, 4).await;
    assert_eq!(
        admin_get_from(&h, probe, "/healthz", Duration::from_millis(500)).await,
        None,
        "a fifth connection must wait while every slot is held"
    );
    drop(held);
    assert_eq!(
        admin_get_from(&h, probe, "/healthz", Duration::from_secs(10)).await,
        Some(200)
    );
    h.signer.shutdown().await.unwrap();
}

/// Attack: `WatchBundle` streams opened and kept, each a task and a queue
/// in the signer for as long as the client likes — bounded otherwise only
/// by connections × streams per connection (hundreds of thousands). Beyond
/// `bundle.max_watchers` a new stream is refused; a place freed by a client
/// that leaves serves the next.
#[tokio::test]
async fn watch_bundle_streams_beyond_max_watchers_are_refused() {
    let h = Harness::start_with(|c| {
        c.bundle.max_watchers = 2;
        c.bundle.max_watchers_per_ip = 0;
    })
    .await;
    let mut client = TrustBundleServiceClient::new(h.channel_from(None).await);
    let watch = || WatchBundleRequest {
        trust_domain: "cluster.local".to_string(),
    };
    let first = client.watch_bundle(watch()).await.unwrap().into_inner();
    let second = client.watch_bundle(watch()).await.unwrap().into_inner();
    let third = client.watch_bundle(watch()).await;
    match third {
        Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}"),
        Ok(_) => panic!("a third watcher was admitted past bundle.max_watchers = 2"),
    }
    let text = h.signer.metrics().render().unwrap();
    assert_eq!(sample(&text, "meshward_signer_bundle_watchers"), Some(2.0));
    assert_counted(&text, "meshward_signer_bundle_watchers_refused_total");
    // A watcher leaves: its place is free again (bounded wait while the
    // signer notices the stream is gone).
    drop(first);
    let mut admitted = None;
    for _ in 0..100 {
        if let Ok(s) = client.watch_bundle(watch()).await {
            admitted = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted.is_some(), "the freed place was never given out");
    drop((second, admitted, client));
    h.signer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_take_every_watch_bundle_place() {
    let h = Harness::start_with(|c| {
        c.bundle.max_watchers = 10;
        c.bundle.max_watchers_per_ip = 2;
    })
    .await;
    let watch = || WatchBundleRequest {
        trust_domain: "cluster.local".to_string(),
    };
    let mut greedy = TrustBundleServiceClient::new(h.channel_from(None).await);
    let first = greedy.watch_bundle(watch()).await.unwrap().into_inner();
    let second = greedy.watch_bundle(watch()).await.unwrap().into_inner();
    match greedy.watch_bundle(watch()).await {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
            assert!(status.message().contains("max_watchers_per_ip"), "{status}");
        }
        Ok(_) => panic!("a third stream from one address was admitted past its share of 2"),
    }
    // Another address still gets a place while the first holds its share.
    let other = "127.0.0.2".parse().unwrap();
    let mut neighbour = TrustBundleServiceClient::new(h.channel_from(Some(other)).await);
    let theirs = neighbour.watch_bundle(watch()).await.unwrap().into_inner();
    let text = h.signer.metrics().render().unwrap();
    assert_eq!(sample(&text, "meshward_signer_bundle_watchers"), Some(3.0));
    assert_counted(
        &text,
        "meshward_signer_bundle_watchers_refused_per_address_total",
    );
    assert_eq!(
        sample(&text, "meshward_signer_bundle_watchers_refused_total"),
        Some(0.0),
        "a per-address refusal was counted as the global limit"
    );
    // The greedy address closes one stream: its share frees (bounded wait
    // while the signer notices the stream is gone).
    drop(first);
    let mut admitted = None;
    for _ in 0..100 {
        if let Ok(s) = greedy.watch_bundle(watch()).await {
            admitted = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admitted.is_some(),
        "the address's freed share was never given back"
    );
    drop((second, theirs, admitted, greedy, neighbour));
    h.signer.shutdown().await.unwrap();
}
