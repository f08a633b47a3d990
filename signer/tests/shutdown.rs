//! A clean shutdown of the real binary: SIGTERM in the middle of load stops
//! it accepting, answers what it admitted, leaves every certificate it
//! handed out in the ledger, and exits 0 within `server.shutdown_drain`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use meshward_signer::ledger::{CertDigest, Ledger, SqliteLedger, SqliteOptions};
use spiffe::SpiffeId;
use tonic::Code;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
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
    let tokens = Arc::new(TokenIssuer::generate(ISSUER, JwtAlgorithm::Es256).unwrap());
    let jwks = dir.path().join("jwks.json");
    tokens.write_jwks(&jwks).unwrap();
    let data = dir.path().join("ca");
    let config = dir.path().join("signer.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:0"
shutdown_drain = "5s"
[ca]
data_dir = {data:?}
[policy]
rate_limit_burst = 0
[authn]
failure_limit_burst = 0
[[authn.jwt]]
issuer = "{ISSUER}"
jwks_file = {jwks:?}
"#,
            data = data.display().to_string(),
            jwks = jwks.display().to_string(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshward-signer"))
        .args([
            "--log-format",
            "json",
            "serve",
            "-c",
            config.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The gRPC address from the "serving" log line (bounded: the process
    // ends the stream if it dies).
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = v["fields"]["grpc_addr"].as_str() {
                    let _ = addr_tx.send(addr.to_string());
                    sent = true;
                }
            }
            lines.push(line);
        }
        lines
    });
    let addr: std::net::SocketAddr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the signer never logged its address")
        .parse()
        .unwrap();
    let roots = std::fs::read_to_string(data.join("root-cert.pem")).unwrap();

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
                        seen.errors.push(format!("{:?} {}", s.code(), s.message()));
                        if s.code() == Code::Unavailable {
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
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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
    let log = log.join().unwrap();
    assert!(
        log.iter().any(|l| l.contains("shutting down")),
        "{}",
        log.join("\n")
    );

    let mut handed_out = Vec::new();
    for c in clients {
        let seen = c.await.unwrap();
        for e in &seen.errors {
            // A request the signer admitted is answered; after the GOAWAY a
            // client's next request finds the port closed: UNAVAILABLE,
            // never a stream reset halfway through an answer.
            let lower = e.to_lowercase();
            assert!(
                !lower.contains("reset") && !lower.contains("protocol error"),
                "a client saw a reset: {e}"
            );
            assert!(lower.starts_with("unavailable"), "{e}");
        }
        handed_out.extend(seen.issued);
    }
    assert!(handed_out.len() >= 100);
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
