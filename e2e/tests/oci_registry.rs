//! The filter's OCI image through a real registry: `meshward-e2e oci`'s
//! layout is pushed with skopeo (as an operator would) to Debian's
//! `docker-registry` (the CNCF distribution registry) on 127.0.0.1, then
//! pulled back over the registry API the way Istio's agent does — manifest
//! by tag, digest checked, `plugin.wasm` out of the last layer — and the
//! pulled plugin runs in the proxy-wasm host.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/registry.rs"]
mod registry;

use meshward_e2e::host::Plugin;
use meshward_e2e::oci::{plugin_from_manifest, write_layout};
use meshward_e2e::wasm::read_filter_wasm;
use registry::{Registry, tools};

const REPOSITORY: &str = "meshward/meshward-filter";

#[tokio::test(flavor = "multi_thread")]
async fn filter_image_pushed_with_skopeo_is_pulled_back_as_istio_does_and_runs() {
    let Some((registry_bin, skopeo)) = tools() else {
        return;
    };
    let registry = Registry::start(&registry_bin).await;
    let wasm = read_filter_wasm().unwrap();
    let layout = tempfile::tempdir().unwrap();
    let image = write_layout(
        &wasm,
        layout.path(),
        "0.1.0",
        "https://github.com/meshward/meshward",
        "0.1.0",
    )
    .unwrap();

    // What the operator runs (`meshward-e2e oci` prints it).
    registry.push(&skopeo, layout.path(), "0.1.0", REPOSITORY);

    // Istio's agent: the manifest by tag, its digest (the WasmPlugin's
    // sha256), then the blobs it names.
    let (manifest, digest, blobs) = registry.pull(REPOSITORY, "0.1.0").await;
    assert_eq!(
        digest, image.manifest_digest,
        "the pushed image's digest is not the one printed for WasmPlugin.sha256"
    );
    let pulled = plugin_from_manifest(&manifest, |d| {
        blobs
            .get(d)
            .cloned()
            .ok_or_else(|| format!("blob {d} not fetched"))
    })
    .unwrap();
    assert_eq!(pulled, wasm, "the pulled plugin.wasm differs");

    // And the pulled module is the filter: it loads and takes a config.
    Plugin::load(
        &pulled,
        r#"{"rules": [{"name": "r", "action": "ALLOW", "from": [{"namespaces": ["shop"]}]}]}"#,
    )
    .unwrap();
}
