//! An OCI registry for the image tests: Debian's `docker-registry` on
//! 127.0.0.1 with its storage in a temporary directory, stopped by its PID,
//! and skopeo to push to it. `scripts/registry` installs both; without them
//! the tests fail naming what to do, unless `MESHWARD_SKIP_REGISTRY_TESTS=1`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The registry and skopeo, or `None` when told to skip.
pub fn tools() -> Option<(PathBuf, PathBuf)> {
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
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on 127.0.0.1 when asked (it can be taken before it is
/// bound: callers retry or fail loudly).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Registry {
    pub async fn start(binary: &Path) -> Registry {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Registry {
    /// `skopeo copy` the image tagged `tag` in the layout `layout` to
    /// `repository:tag` here (plain HTTP).
    pub fn push(&self, skopeo: &Path, layout: &Path, tag: &str, repository: &str) {
        let push = Command::new(skopeo)
            .arg("copy")
            .arg("--dest-tls-verify=false")
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!(
                "docker://127.0.0.1:{}/{repository}:{tag}",
                self.port
            ))
            .output()
            .unwrap();
        assert!(
            push.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&push.stderr)
        );
    }

    /// What a runtime or Istio's agent does: the OCI manifest by tag (with
    /// the registry's digest for it), then every blob it names.
    pub async fn pull(
        &self,
        repository: &str,
        tag: &str,
    ) -> (Vec<u8>, String, HashMap<String, Vec<u8>>) {
        let client = reqwest::Client::new();
        let response = client
            .get(self.url(&format!("/v2/{repository}/manifests/{tag}")))
            .header("accept", meshward_e2e::oci::MANIFEST_MEDIA_TYPE)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            meshward_e2e::oci::MANIFEST_MEDIA_TYPE,
            "the registry converted the manifest"
        );
        let digest = response.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string();
        let manifest = response.bytes().await.unwrap().to_vec();
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let mut blobs = HashMap::new();
        let descriptors =
            std::iter::once(&parsed["config"]).chain(parsed["layers"].as_array().unwrap());
        for d in descriptors {
            let blob = d["digest"].as_str().unwrap().to_string();
            let bytes = client
                .get(self.url(&format!("/v2/{repository}/blobs/{blob}")))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            blobs.insert(blob, bytes);
        }
        (manifest, digest, blobs)
    }
}
