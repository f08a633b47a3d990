//! A clean shutdown of the real binary: SIGTERM in the middle of load stops
//! it accepting, answers what it admitted, leaves every certificate it
//! handed out in the ledger, and exits 0 within `server.shutdown_drain`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use binary::Served;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use meshward_signer::ledger::{CertDigest, Ledger, SqliteLedger, SqliteOptions};
use spiffe::SpiffeId;
use tonic::Code;

const CLIENTS: usize = 8;

/// What one client saw.
#[derive(Default)]
struct Seen {
    issued: Vec<Vec<u8>>,
    errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_load_answers_what_was_admitted_and_every_certificate_handed_out_is_in_the_ledger()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(dir.path(), "rate_limit_burst = 0");
    let (addr, roots, tokens, data) = (
        served.grpc_addr,
        served.roots_pem.clone(),
        served.tokens.clone(),
        served.data_dir.clone(),
    );
    let issued = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (tokens, roots, issued) = (tokens.clone(), roots.clone(), issued.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let client = CaClient::connect(addr, &roots, "localhost").await.unwrap();
            let sa = format!("sa{i}");
            let id = SpiffeId::new(format!("spiffe://cluster.local/ns/load/sa/{sa}")).unwrap();
            // Bounded: the signer stops within seconds of SIGTERM.
            for _ in 0..10_000 {
                let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
                let opts = CallOptions {
                    token: Some(
                        tokens
                            .token_for(
                                "load",
                                &sa,
                                time::OffsetDateTime::now_utc().unix_timestamp(),
                            )
                            .unwrap(),
                    ),
                    ..CallOptions::default()
                };
                match client.request_certificate(&key, &id, &opts).await {
                    Ok(cert) => {
                        seen.issued.push(cert.leaf.to_vec());
                        issued.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(meshward_signer::client::ClientError::Status(s)) => {
                        // With the source: an HTTP/2 GOAWAY shows only there.
                        seen.errors
                            .push(format!("{:?} {} {s:?}", s.code(), s.message()));
                        if matches!(s.code(), Code::Unavailable | Code::Cancelled) {
                            break;
                        }
                    }
                    Err(e) => {
                        seen.errors.push(e.to_string());
                        break;
                    }
                }
            }
            seen
        }));
    }
    // SIGTERM once the load is going.
    let deadline = Instant::now() + Duration::from_secs(60);
    while issued.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    served.signal("TERM");
    let mut child = std::mem::replace(
        &mut served.child,
        std::process::Command::new("true").spawn().unwrap(),
    );
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        took < Duration::from_secs(5 + 3),
        "took {took:?}, beyond shutdown_drain"
    );
    served.wait_for_log("shutting down", Duration::from_secs(5));

    let mut handed_out = Vec::new();
    let mut resets = 0;
    let mut refused_by_goaway = 0;
    for c in clients {
        let seen = c.await.unwrap();
        for e in &seen.errors {
            // A request the signer admitted is answered. After the GOAWAY a
            // client's next request finds the port closed or the connection
            // closed cleanly (UNAVAILABLE), or, queued on the closing
            // connection and never sent, is cancelled by its own HTTP/2
            // stack (CANCELLED). A stream the client opened past the
            // GOAWAY's last-stream-id fails with that GOAWAY (NO_ERROR):
            // RFC 9113 §6.8 says the server never processed it and it is
            // safe to retry (grpc-go, istio-agent's client, retries it as
            // UNAVAILABLE; tonic reports it as an h2 error). What the signer
            // itself answers is never anything else.
            let lower = e.to_lowercase();
            let goaway = lower.contains("goaway(") && lower.contains("no_error, remote");
            let transport = [
                "connection reset",
                "transport error",
                "tcp connect",
                "operation was canceled",
                "broken pipe",
            ]
            .iter()
            .any(|t| lower.contains(t));
            assert!(
                lower.starts_with("unavailable")
                    || lower.starts_with("cancelled")
                    || goaway
                    || transport,
                "the signer answered something else than UNAVAILABLE while stopping: {e}"
            );
            if goaway {
                refused_by_goaway += 1;
            }
            if lower.contains("reset") || lower.contains("broken pipe") {
                resets += 1;
            }
        }
        handed_out.extend(seen.issued);
    }
    eprintln!("streams refused by the GOAWAY: {refused_by_goaway}; resets: {resets}");
    assert!(handed_out.len() >= 100);
    // Connections still in the listen backlog at shutdown are taken and
    // closed cleanly (they used to be reset by the kernel). One reset is
    // left to chance: a connection completed between the last backlog
    // accept and the listener's close, or a request written on a
    // connection hyper closed after its final GOAWAY (about 1 run in 40
    // on 2 busy cores; SECURITY.md).
    assert!(resets <= 1, "{resets} clients saw a reset");
    let ledger = SqliteLedger::open(&SqliteOptions {
        path: data.join("ledger.sqlite"),
        busy_timeout: Duration::from_secs(5),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    for leaf in &handed_out {
        let digest = CertDigest::of(leaf);
        assert!(
            ledger.lookup(digest).await.unwrap().is_some(),
            "certificate {digest} was handed out but is not in the ledger"
        );
    }
}
