//! Configuration reload on the real binary: `SIGHUP` re-reads the config
//! file; a valid new issuance policy applies to the next request without
//! dropping a connection, an invalid file is refused with a log line and
//! the running configuration keeps serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::time::Duration;

use binary::{Served, config_text};
use meshward_proto::meshward::v1::WatchBundleRequest;
use meshward_proto::meshward::v1::trust_bundle_service_client::TrustBundleServiceClient;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use spiffe::SpiffeId;

async fn ttl_of_next_certificate(served: &Served, client: &CaClient) -> i64 {
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let id = SpiffeId::new("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    let opts = CallOptions {
        token: Some(served.token("shop", "web")),
        ..CallOptions::default()
    };
    let cert = client.request_certificate(&key, &id, &opts).await.unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(cert.leaf.as_ref()).unwrap();
    c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
}

fn rewrite(served: &Served, body: &str) {
    let text = config_text(
        &served.data_dir,
        &served.data_dir.join("../jwks.json"),
        body,
    );
    let tmp = served.config.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &served.config).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_policy_without_dropping_connections_and_refuses_an_invalid_one() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(
        dir.path(),
        "default_ttl = \"1h\"\nmax_ttl = \"1h\"\nbackdate = \"0s\"\nrate_limit_burst = 0",
    );
    let client = CaClient::connect(served.grpc_addr, &served.roots_pem, "localhost")
        .await
        .unwrap();
    assert_eq!(ttl_of_next_certificate(&served, &client).await, 3600);
    // A long-lived stream (as istio-agent's WatchBundle) open across reloads.
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", served.grpc_addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&served.roots_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = TrustBundleServiceClient::new(channel)
        .watch_bundle(WatchBundleRequest {
            trust_domain: "cluster.local".to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();

    // A shorter TTL, and a listener change that needs a restart.
    rewrite(
        &served,
        "[policy]\ndefault_ttl = \"30m\"\nmax_ttl = \"30m\"\nbackdate = \"0s\"\nrate_limit_burst = 0\n",
    );
    let mark = served.mark();
    served.signal("HUP");
    served.wait_for_log_since(mark, "configuration reloaded", Duration::from_secs(10));
    assert_eq!(ttl_of_next_certificate(&served, &client).await, 1800);

    // An invalid file (default above max): refused, the 30m policy stays.
    rewrite(
        &served,
        "[policy]\ndefault_ttl = \"48h\"\nmax_ttl = \"24h\"\nrate_limit_burst = 0\n",
    );
    let mark = served.mark();
    served.signal("HUP");
    let refused = served.wait_for_log_since(
        mark,
        "configuration reload refused",
        Duration::from_secs(10),
    );
    assert!(refused.contains("default_ttl"), "{refused}");
    assert_eq!(ttl_of_next_certificate(&served, &client).await, 1800);

    // A setting only a restart can change is named, and keeps its value.
    rewrite(
        &served,
        "[policy]\ndefault_ttl = \"30m\"\nmax_ttl = \"30m\"\nbackdate = \"0s\"\nrate_limit_burst = 0\n[ledger]\nretention = \"2days\"\n",
    );
    let mark = served.mark();
    served.signal("HUP");
    let warned = served.wait_for_log_since(mark, "only after a restart", Duration::from_secs(10));
    assert!(warned.contains("ledger"), "{warned}");

    // The stream opened before the reloads is still open: no message (the
    // bundle did not change), no end.
    let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(next.is_err(), "the WatchBundle stream ended: {next:?}");
    // And the process still serves.
    assert_eq!(ttl_of_next_certificate(&served, &client).await, 1800);
}
