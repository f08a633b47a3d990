//! The filter's OCI image through a real registry: `meshward-e2e oci`'s
//! layout is pushed with skopeo (as an operator would) to Debian's
//! `docker-registry` (the CNCF distribution registry) on 127.0.0.1, then
//! pulled back over the registry API the way Istio's agent does — manifest
//! by tag, digest checked, `plugin.wasm` out of the last layer — and the
//! pulled plugin runs in the proxy-wasm host.
//!
//! `scripts/registry` installs both when missing (the test command calls
//! it); without them the test fails naming what to do, unless
//! `MESHWARD_SKIP_REGISTRY_TESTS=1`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshward_e2e::host::Plugin;
use meshward_e2e::oci::{MANIFEST_MEDIA_TYPE, plugin_from_manifest, write_layout};
use meshward_e2e::wasm::read_filter_wasm;

const REPOSITORY: &str = "meshward/meshward-filter";

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The registry and skopeo, or `None` when told to skip.
fn tools() -> Option<(PathBuf, PathBuf)> {
    if std::env::var("MESHWARD_SKIP_REGISTRY_TESTS").as_deref() == Ok("1") {
        eprintln!("MESHWARD_SKIP_REGISTRY_TESTS=1: registry test skipped");
        return None;
    }
    match (tool("docker-registry"), tool("skopeo")) {
        (Some(registry), Some(skopeo)) => Some((registry, skopeo)),
        _ => panic!(
            "docker-registry and skopeo are needed: run scripts/registry, or set \
             MESHWARD_SKIP_REGISTRY_TESTS=1"
        ),
    }
}

/// A registry on 127.0.0.1, its storage in a temporary directory, stopped
/// (by its PID) when dropped.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Registry {
    async fn start(binary: &Path) -> Registry {
        let mut last = String::new();
        // A port can be taken between choosing and binding it: try a few.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    \
                     rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut registry = Registry {
                child,
                port,
                _dir: dir,
            };
            for _ in 0..200 {
                if let Ok(r) = reqwest::get(registry.url("/v2/")).await
                    && r.status() == 200
                {
                    return registry;
                }
                if let Ok(Some(status)) = registry.child.try_wait() {
                    last = format!(
                        "exited {status}: {}",
                        std::fs::read_to_string(registry._dir.path().join("registry.log"))
                            .unwrap_or_default()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

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
    let push = Command::new(&skopeo)
        .arg("copy")
        .arg("--dest-tls-verify=false")
        .arg(format!("oci:{}:0.1.0", layout.path().display()))
        .arg(format!(
            "docker://127.0.0.1:{}/{REPOSITORY}:0.1.0",
            registry.port
        ))
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&push.stderr)
    );

    // Istio's agent: the manifest by tag, its digest (the WasmPlugin's
    // sha256), then the blobs it names.
    let client = reqwest::Client::new();
    let response = client
        .get(registry.url(&format!("/v2/{REPOSITORY}/manifests/0.1.0")))
        .header("accept", MANIFEST_MEDIA_TYPE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        MANIFEST_MEDIA_TYPE,
        "the registry converted the manifest"
    );
    assert_eq!(
        response.headers()["docker-content-digest"],
        image.manifest_digest.as_str(),
        "the pushed image's digest is not the one printed for WasmPlugin.sha256"
    );
    let manifest = response.bytes().await.unwrap().to_vec();
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut blobs = HashMap::new();
    let descriptors =
        std::iter::once(&parsed["config"]).chain(parsed["layers"].as_array().unwrap());
    for d in descriptors {
        let digest = d["digest"].as_str().unwrap().to_string();
        let bytes = client
            .get(registry.url(&format!("/v2/{REPOSITORY}/blobs/{digest}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        blobs.insert(digest, bytes);
    }
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
