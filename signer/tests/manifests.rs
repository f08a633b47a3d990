//! The signer config shipped in `istio-manifests/` must parse and validate with
//! the signer that will read it: a typo there is an outage at deploy time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshward_signer::config::Config;

#[test]
fn shipped_istio_manifest_signer_config_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../istio-manifests/signer/signer.toml"
    );
    let text = std::fs::read_to_string(path).expect("read manifest config");
    let config = Config::from_toml(&text, path).expect("manifest config parses");
    config.validate().expect("manifest config validates");
    assert_eq!(config.ca.backend, "cacerts");
    assert_eq!(config.server.grpc_addr.port(), 15012);
    assert!(
        config
            .server
            .dns_names
            .iter()
            .any(|n| n == "meshward-signer.istio-system.svc"),
        "istio-agent dials meshward-signer.istio-system.svc:15012 and checks this name"
    );
}
