//! The fleet view (`/v1/fleet`, `[dashboard] fleet`): one replica gathers
//! every replica's status and counters; a replica that publishes other
//! roots is flagged; a replica that is down, silent or hostile is a row
//! with its error and costs the others nothing; page loads do not multiply
//! the requests the replicas get.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/browser.rs"]
mod browser;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/plugged_ca.rs"]
mod plugged_ca;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use browser::{chromium, dump_dom, element_text};
use harness::{Harness, http_get, id};
use meshward_signer::dashboard::fleet::{FLEET_CACHE, FleetView, MAX_METRICS_BYTES};
use meshward_signer::issuer::cacerts::CaCertsConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A loopback port nobody listens on right now (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn fleet_of(h: &Harness) -> FleetView {
    let (code, body) = http_get(h.signer.admin_addr(), "/v1/fleet").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A signer whose admin port is `admin_port` and whose fleet is `fleet`.
async fn replica(admin_port: u16, fleet: Vec<String>, cacerts: Option<CaCertsConfig>) -> Harness {
    Harness::start_with(move |c| {
        c.server.admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
        c.dashboard.fleet = fleet;
        c.dashboard.fleet_timeout = Duration::from_secs(3);
        if let Some(cacerts) = cacerts {
            c.ca.backend = "cacerts".to_string();
            c.ca.cacerts = Some(cacerts);
        }
    })
    .await
}

/// Two replicas plugged into the same CA, the first gathering both.
async fn two_replicas_sharing_a_ca(
    dir: &std::path::Path,
    extra: Vec<String>,
) -> (Harness, Harness) {
    let root = plugged_ca::root("fleet root");
    let ca = plugged_ca::intermediate("istioca", &root);
    plugged_ca::write_istio(dir, &ca, &[], &root);
    let cacerts = CaCertsConfig {
        dir: dir.to_path_buf(),
        reload_interval: Duration::from_secs(10),
    };
    let b = replica(0, vec![], Some(cacerts.clone())).await;
    let a_port = free_port();
    let mut fleet = vec![
        format!("127.0.0.1:{a_port}"),
        b.signer.admin_addr().to_string(),
    ];
    fleet.extend(extra);
    let a = replica(a_port, fleet, Some(cacerts)).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_shows_every_replica_with_its_counters_and_that_roots_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas_sharing_a_ca(dir.path(), vec![]).await;
    for i in 0..3 {
        let sa = format!("a{i}");
        a.issue("shop", &sa, &a.opts("shop", &sa)).await.unwrap();
    }
    for i in 0..2 {
        let sa = format!("b{i}");
        b.issue("shop", &sa, &b.opts("shop", &sa)).await.unwrap();
    }
    // A refusal on b: a token for another identity than the CSR's.
    let wrong = b
        .issue_for(&id("shop", "b0"), &b.opts("shop", "other"))
        .await;
    assert!(wrong.is_err());

    let f = fleet_of(&a).await;
    assert_eq!(f.replicas.len(), 2, "{f:?}");
    assert_eq!(f.answered, 2, "{f:?}");
    assert!(f.roots_agree && f.versions_agree, "{f:?}");
    assert_eq!((f.totals.issued, f.totals.refused), (5.0, 1.0), "{f:?}");
    let row = |addr: SocketAddr| {
        f.replicas
            .iter()
            .find(|r| r.address == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} not in {f:?}"))
    };
    let (ra, rb) = (row(a.signer.admin_addr()), row(b.signer.admin_addr()));
    assert!(ra.this_replica && !rb.this_replica, "{f:?}");
    assert_eq!(ra.counters.unwrap().issued, 3.0);
    assert_eq!(rb.counters.unwrap().issued, 2.0);
    assert_eq!(rb.counters.unwrap().refused, 1.0);
    for r in [ra, rb] {
        let s = r.status.as_ref().unwrap();
        assert_eq!(r.ready, Some(true));
        assert_eq!(s.backend, "cacerts");
        assert_eq!(s.roots.len(), 1);
        assert!(r.error.is_none(), "{r:?}");
    }
    assert_eq!(
        ra.status.as_ref().unwrap().roots,
        rb.status.as_ref().unwrap().roots
    );
}

/// Counters since each replica started say little during an incident: the
/// view also gives each replica's issued and refused per second since the
/// previous gather, which is what changed while the operator watched.
#[tokio::test(flavor = "multi_thread")]
async fn fleet_rates_cover_what_each_replica_did_since_the_previous_gather() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas_sharing_a_ca(dir.path(), vec![]).await;
    a.issue("shop", "early", &a.opts("shop", "early"))
        .await
        .unwrap();
    let first = fleet_of(&a).await;
    assert!(
        first.replicas.iter().all(|r| r.rates.is_none()),
        "{first:?}"
    );
    assert_eq!(first.total_rates, None);

    for i in 0..4 {
        let sa = format!("a{i}");
        a.issue("shop", &sa, &a.opts("shop", &sa)).await.unwrap();
    }
    let wrong = b
        .issue_for(&id("shop", "b0"), &b.opts("shop", "other"))
        .await;
    assert!(wrong.is_err());
    tokio::time::sleep(FLEET_CACHE + Duration::from_millis(300)).await;

    let second = fleet_of(&a).await;
    let rates = |addr: SocketAddr| {
        second
            .replicas
            .iter()
            .find(|r| r.address == addr.to_string())
            .and_then(|r| r.rates)
            .unwrap_or_else(|| panic!("no rates for {addr} in {second:?}"))
    };
    let (ra, rb) = (rates(a.signer.admin_addr()), rates(b.signer.admin_addr()));
    let window = FLEET_CACHE.as_secs_f64();
    assert!(
        ra.over_seconds >= window && ra.over_seconds < window + 5.0,
        "{ra:?}"
    );
    let close = |x: f64, want: f64| (x - want).abs() < 1e-6;
    assert!(close(ra.issued_per_second * ra.over_seconds, 4.0), "{ra:?}");
    assert!(close(ra.refused_per_second, 0.0), "{ra:?}");
    assert!(close(rb.issued_per_second, 0.0), "{rb:?}");
    assert!(
        close(rb.refused_per_second * rb.over_seconds, 1.0),
        "{rb:?}"
    );
    let total = second.total_rates.unwrap();
    assert!(
        close(total.issued_per_second, ra.issued_per_second)
            && close(total.refused_per_second, rb.refused_per_second),
        "{total:?}"
    );

    // The page, loaded while that view is still the cached one, says it.
    let Some(browser) = chromium() else { return };
    let url = format!("http://{}/dashboard", a.signer.admin_addr());
    let dom = dump_dom(&browser, &url, Duration::from_secs(3)).await;
    let summary = element_text(&dom, "fleet-summary");
    assert!(
        summary.contains(&format!(
            "(now {:.2}/s issued, {:.2}/s refused)",
            total.issued_per_second, total.refused_per_second
        )),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_left_on_another_root_is_flagged_on_the_page() {
    // Two built-in CAs that were never meant to be one mesh: what a replica
    // left behind by a root rotation looks like to workloads.
    let b = replica(0, vec![], None).await;
    let a_port = free_port();
    let a = replica(
        a_port,
        vec![
            format!("127.0.0.1:{a_port}"),
            b.signer.admin_addr().to_string(),
        ],
        None,
    )
    .await;
    let f = fleet_of(&a).await;
    assert_eq!(f.answered, 2, "{f:?}");
    assert!(!f.roots_agree, "{f:?}");

    let Some(browser) = chromium() else { return };
    let url = format!("http://{}/dashboard", a.signer.admin_addr());
    let dom = dump_dom(&browser, &url, Duration::from_secs(3)).await;
    assert!(
        dom.contains("data-loaded=\"true\""),
        "never rendered:\n{dom}"
    );
    assert!(
        element_text(&dom, "fleet-warnings").contains("Replicas publish different roots"),
        "{dom}"
    );
    assert!(
        element_text(&dom, "fleet-summary").starts_with("2 of 2 replicas answered"),
        "{dom}"
    );
    assert!(dom.contains("(this page)"), "{dom}");
}

/// A raw HTTP/1.1 peer: counts requests, answers each with `answer`.
async fn fake_peer(
    answer: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split(' ').nth(1).unwrap_or("/").to_string();
                match answer(&path) {
                    Some(bytes) => {
                        let _ = conn.write_all(&bytes).await;
                    }
                    // Endless: a chunked body that never ends.
                    None => {
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await;
                        let chunk = vec![b'#'; 64 << 10];
                        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                        framed.extend_from_slice(&chunk);
                        framed.extend_from_slice(b"\r\n");
                        // Bounded: 4× the cap at most, then give up.
                        for _ in 0..(4 * MAX_METRICS_BYTES / chunk.len()) {
                            if conn.write_all(&framed).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, requests)
}

fn http_ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_that_is_down_silent_or_flooding_is_a_row_with_its_error() {
    // Down: nothing listens on the port.
    let down = format!("127.0.0.1:{}", free_port());
    // Silent: accepts, reads, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            held.push(c);
        }
    });
    // Flooding: a /metrics (and everything else) that never ends.
    let (flood, _) = fake_peer(|_| None).await;

    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = two_replicas_sharing_a_ca(
        dir.path(),
        vec![down.clone(), silent_addr.to_string(), flood.to_string()],
    )
    .await;
    let f = fleet_of(&a).await;
    assert_eq!(f.replicas.len(), 5, "{f:?}");
    assert_eq!(f.answered, 2, "the two real replicas still answer: {f:?}");
    assert!(f.roots_agree, "rows without a status do not count: {f:?}");
    let error_of = |addr: &str| {
        let r = f.replicas.iter().find(|r| r.address == addr).unwrap();
        assert!(r.status.is_none() && r.counters.is_none(), "{r:?}");
        r.error.clone().unwrap()
    };
    let e = error_of(&down);
    assert!(e.to_lowercase().contains("refused"), "{e}");
    let e = error_of(&silent_addr.to_string());
    assert!(e.contains("no answer in time"), "{e}");
    let e = error_of(&flood.to_string());
    assert!(e.contains("cut off"), "{e}");
    // The gatherer kept serving.
    assert_eq!(http_get(a.signer.admin_addr(), "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn page_loads_cannot_multiply_requests_to_the_replicas() {
    let status = r#"{"version":"0.0.0","replica":"fake","instance":"f","started_at":0,
        "backend":"builtin","ledger":"off","signing_ca":{"not_before":0,"not_after":1},
        "bundle":{"sequence":1,"roots":[]}}"#;
    let (peer, requests) = fake_peer(move |path| {
        Some(http_ok(match path {
            "/v1/status" => status,
            "/readyz" => "ready",
            _ => "meshward_signer_requests_total{outcome=\"issued\"} 9\n",
        }))
    })
    .await;
    let h = replica(0, vec![peer.to_string()], None).await;
    // Twenty page loads at once, then twenty more one after the other.
    let admin = h.signer.admin_addr();
    let loads: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { http_get(admin, "/v1/fleet").await }))
        .collect();
    for l in loads {
        assert_eq!(l.await.unwrap().0, 200);
    }
    for _ in 0..20 {
        let f = fleet_of(&h).await;
        assert_eq!(f.totals.issued, 9.0, "{f:?}");
    }
    // One gather (three requests), unless the 5 s cache ran out during
    // the loop, which allows one more.
    let n = requests.load(Ordering::SeqCst);
    assert!(n == 3 || n == 6, "{n} requests reached the replica");
}

#[tokio::test]
async fn fleet_settings_that_cannot_work_are_refused_at_start() {
    for (edit, needle) in [
        (
            Box::new(|c: &mut meshward_signer::config::Config| {
                c.dashboard.fleet = vec!["http://signer:15014".into()];
            }) as Box<dyn FnOnce(&mut meshward_signer::config::Config)>,
            "not host:port",
        ),
        (
            Box::new(|c: &mut meshward_signer::config::Config| {
                c.dashboard.fleet = vec!["signer:15014".into()];
                c.dashboard.fleet_timeout = Duration::from_secs(600);
            }),
            "fleet_timeout",
        ),
        (
            Box::new(|c: &mut meshward_signer::config::Config| {
                c.dashboard.fleet_max_replicas = 0;
            }),
            "fleet_max_replicas",
        ),
    ] {
        let mut config = meshward_signer::config::Config::default();
        edit(&mut config);
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_fleet_settings_there_is_no_fleet_route() {
    let h = Harness::start().await;
    let (code, body) = http_get(h.signer.admin_addr(), "/v1/fleet").await;
    assert_eq!(code, 404);
    assert!(body.contains("dashboard.fleet"), "{body}");
    let (_, status) = http_get(h.signer.admin_addr(), "/v1/status").await;
    assert!(status.contains("\"fleet\":false"), "{status}");
}
