//! The signer's container image, as `scripts/signer-image` builds it (the
//! test command runs it first): pushed with skopeo to a real registry,
//! pulled back as a container runtime would, its layer unpacked with GNU
//! tar, and the signer started from the unpacked files alone — static, so it
//! needs nothing from this machine — serving its dashboard's playground from
//! the image. Its configuration must agree with the StatefulSet.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use meshward_e2e::oci::{
    LAYER_MEDIA_TYPE, SIGNER_BINARY, SIGNER_CA_BUNDLE, SIGNER_PLAYGROUND, digest, elf_interpreter,
};
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use registry::{Registry, free_port, tools};

const REPOSITORY: &str = "meshward/meshward-signer";
const TAG: &str = env!("CARGO_PKG_VERSION");

/// The layout `scripts/signer-image` wrote: `MESHWARD_SIGNER_IMAGE`, else
/// `target/oci/meshward-signer` in the repo.
fn layout() -> PathBuf {
    let path = std::env::var_os("MESHWARD_SIGNER_IMAGE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/oci/meshward-signer"),
        PathBuf::from,
    );
    assert!(
        path.join("index.json").is_file(),
        "no signer image at {}: run scripts/signer-image (scripts/test does this first) \
         or set MESHWARD_SIGNER_IMAGE",
        path.display()
    );
    path
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

/// Stops the signer started from the image (by its PID) when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn signer_image_from_the_registry_runs_on_its_own_files_and_matches_the_statefulset() {
    let Some((registry_bin, skopeo)) = tools() else {
        return;
    };
    let layout = layout();
    let registry = Registry::start(&registry_bin).await;
    registry.push(&skopeo, &layout, TAG, REPOSITORY);
    let (manifest, manifest_digest, blobs) = registry.pull(REPOSITORY, TAG).await;
    assert_eq!(manifest_digest, digest(&manifest));

    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blobs[manifest["config"]["digest"].as_str().unwrap()]).unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let run = &config["config"];
    assert_eq!(run["User"], "65532:65532");
    assert_eq!(run["Entrypoint"][0], format!("/{SIGNER_BINARY}"));

    // The StatefulSet runs this image as the user it sets, with the image's
    // default arguments.
    let statefulset = repo_file("istio-manifests/signer/statefulset.yaml");
    assert!(
        statefulset.contains(&format!("image: ghcr.io/meshward/meshward-signer:{TAG}")),
        "the StatefulSet does not run this version's image"
    );
    let args: Vec<String> = run["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{a}"))
        .collect();
    assert!(
        statefulset.contains(&format!("args: [{}]", args.join(", "))),
        "the StatefulSet's args differ from the image's Cmd {args:?}"
    );
    assert!(statefulset.contains("runAsUser: 65532"));
    assert!(
        repo_file("istio-manifests/signer/signer.toml")
            .contains(&format!("playground_wasm = \"/{SIGNER_PLAYGROUND}\"")),
        "the shipped signer.toml does not point at the image's playground module"
    );

    // The layer, unpacked by GNU tar as a runtime would.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], LAYER_MEDIA_TYPE);
    let root = tempfile::tempdir().unwrap();
    let layer_file = root.path().join("layer.tar.gz");
    std::fs::write(&layer_file, &blobs[layers[0]["digest"].as_str().unwrap()]).unwrap();
    let rootfs = root.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&layer_file)
        .arg("-C")
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(untar.success());
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        digest(&{
            let mut tar = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(std::fs::File::open(&layer_file).unwrap()),
                &mut tar,
            )
            .unwrap();
            tar
        })
    );
    let binary = rootfs.join(SIGNER_BINARY);
    assert_eq!(
        elf_interpreter(&std::fs::read(&binary).unwrap()),
        Some(false),
        "the image's signer needs a dynamic loader the image does not have"
    );
    assert!(rootfs.join(SIGNER_CA_BUNDLE).is_file());
    // Its SBOM names the signer at the version it will report, and the
    // crates it is built from with their lockfile checksums.
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rootfs.join(meshward_e2e::sbom::SBOM_PATH)).unwrap())
            .unwrap();
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    assert_eq!(sbom["metadata"]["component"]["version"], TAG);
    let components = sbom["components"].as_array().unwrap();
    let signer_ref = format!("meshward-signer@{TAG}");
    assert!(
        components
            .iter()
            .any(|c| c["bom-ref"] == signer_ref.as_str() && c["type"] == "application")
    );
    let rustls = components
        .iter()
        .find(|c| c["name"] == "rustls")
        .expect("rustls in the SBOM");
    assert_eq!(rustls["hashes"][0]["alg"], "SHA-256");
    // The official CycloneDX 1.5 JSON schema, applied by CycloneDX's own
    // library (scripts/cyclonedx installs it; scripts/test sets the python).
    let python = std::env::var("MESHWARD_CYCLONEDX_PYTHON").unwrap_or_else(|_| "python3".into());
    let validated = Command::new(&python)
        .arg("-c")
        .arg(
            "import sys\n\
             from cyclonedx.schema import SchemaVersion\n\
             from cyclonedx.validation.json import JsonStrictValidator\n\
             e = JsonStrictValidator(SchemaVersion.V1_5).validate_str(open(sys.argv[1]).read())\n\
             sys.exit(str(e) if e else 0)",
        )
        .arg(rootfs.join(meshward_e2e::sbom::SBOM_PATH))
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (run scripts/cyclonedx)"));
    assert!(
        validated.status.success(),
        "the SBOM does not validate against CycloneDX 1.5 (or {python} lacks \
         cyclonedx-python-lib: run scripts/cyclonedx): {}",
        String::from_utf8_lossy(&validated.stderr)
    );

    // Start it from the unpacked files: the playground it serves is the
    // image's.
    let work = tempfile::tempdir().unwrap();
    let tokens = TokenIssuer::generate(
        "https://kubernetes.default.svc.cluster.local",
        JwtAlgorithm::Es256,
    )
    .unwrap();
    let jwks = work.path().join("jwks.json");
    tokens.write_jwks(&jwks).unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let config_file = work.path().join("signer.toml");
    std::fs::write(
        &config_file,
        format!(
            r#"[server]
grpc_addr = "127.0.0.1:{grpc}"
admin_addr = "127.0.0.1:{admin}"
[ca]
data_dir = "{data}"
[[authn.jwt]]
issuer = "https://kubernetes.default.svc.cluster.local"
jwks_file = "{jwks}"
[dashboard]
playground_wasm = "{playground}"
"#,
            data = work.path().join("ca").display(),
            jwks = jwks.display(),
            playground = rootfs.join(SIGNER_PLAYGROUND).display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(work.path().join("signer.log")).unwrap();
    let _signer = Running(
        Command::new(&binary)
            .args(["serve", "--config"])
            .arg(&config_file)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = |path: &str| format!("http://127.0.0.1:{admin}{path}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(url("/readyz")).await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "the image's signer never became ready: {}",
        std::fs::read_to_string(work.path().join("signer.log")).unwrap_or_default()
    );
    let served = reqwest::get(url("/dashboard/playground.wasm"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        served.as_ref(),
        std::fs::read(rootfs.join(SIGNER_PLAYGROUND))
            .unwrap()
            .as_slice()
    );
    let status: serde_json::Value = reqwest::get(url("/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["version"], TAG);
    assert_eq!(status["playground"], true);
}
