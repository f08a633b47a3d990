use std::collections::BTreeSet;
use std::path::PathBuf;

use super::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo metadata` for the whole workspace: every package Cargo resolved
/// for any member and feature, with its license and source.
fn metadata() -> Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
        ])
        .arg(workspace().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The package names of a workspace member's `[dependencies]` (a key
/// renamed with `package = "…"`, there or in the workspace's table, is that
/// package).
fn manifest_dependencies(member: &str) -> BTreeSet<String> {
    let read = |path: PathBuf| -> toml::Value {
        toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let root = read(workspace().join("Cargo.toml"));
    let manifest = read(workspace().join(member).join("Cargo.toml"));
    manifest["dependencies"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(key, spec)| {
            let renamed = |spec: Option<&toml::Value>| {
                spec.and_then(|s| s.get("package"))
                    .and_then(toml::Value::as_str)
                    .map(str::to_string)
            };
            renamed(Some(spec))
                .or_else(|| renamed(root["workspace"]["dependencies"].get(key)))
                .unwrap_or_else(|| key.clone())
        })
        .collect()
}

fn references(doc: &Value, kind: &str) -> BTreeSet<String> {
    doc["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| kind.is_empty() || c["type"] == kind)
        .map(|c| c["bom-ref"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sbom_lists_the_packages_cargo_resolved_for_each_artifact_with_their_checksums() {
    let version = env!("CARGO_PKG_VERSION");
    let bytes = signer_image_sbom(&workspace(), version).unwrap();
    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["bomFormat"], "CycloneDX");
    assert_eq!(doc["specVersion"], "1.5");
    assert_eq!(doc["metadata"]["component"]["type"], "container");

    // Every package is one Cargo resolved, with its version, license and
    // source as `cargo metadata` says.
    let meta = metadata();
    let known: BTreeMap<String, &Value> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                format!(
                    "{}@{}",
                    p["name"].as_str().unwrap(),
                    p["version"].as_str().unwrap()
                ),
                p,
            )
        })
        .collect();
    let listed = references(&doc, "");
    assert!(listed.len() > 100, "{listed:?}");
    for c in doc["components"].as_array().unwrap() {
        let reference = c["bom-ref"].as_str().unwrap();
        let p = known
            .get(reference)
            .unwrap_or_else(|| panic!("{reference} is not a package Cargo resolved"));
        assert_eq!(c["licenses"][0]["expression"], p["license"], "{reference}");
        assert_eq!(
            c.get("hashes").is_some(),
            p["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("registry+")),
            "{reference}"
        );
    }
    assert_eq!(
        references(&doc, "application"),
        BTreeSet::from([
            format!("meshward-playground@{version}"),
            format!("meshward-signer@{version}")
        ])
    );
    // Not compiled into either artifact: what only tests, benches and the
    // e2e tools use, and reqwest's HTTP/3 stack, which another member's
    // features pull into the workspace-wide graph but not into the signer.
    for absent in [
        "meshward-e2e",
        "meshward-bench",
        "wasmtime",
        "tempfile",
        "quinn",
    ] {
        assert!(
            !listed.iter().any(|r| r.starts_with(&format!("{absent}@"))),
            "{absent} in the image's packages"
        );
    }

    // Every crates.io package carries Cargo.lock's checksum; workspace ones none.
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).unwrap();
    let sums = lock_checksums(&lock).unwrap();
    for c in doc["components"].as_array().unwrap() {
        let reference = c["bom-ref"].as_str().unwrap();
        assert_eq!(c["purl"], format!("pkg:cargo/{}", reference), "{reference}");
        match sums.get(reference) {
            Some(sum) => {
                assert_eq!(c["hashes"][0]["alg"], "SHA-256");
                assert_eq!(c["hashes"][0]["content"], sum.as_str(), "{reference}");
            }
            None => {
                assert!(
                    reference.starts_with("meshward-"),
                    "{reference} has no checksum"
                );
                assert!(c.get("hashes").is_none());
            }
        }
    }
    // The graph: the image holds both artifacts; each package's
    // dependencies are the ones cargo tree shows one level down.
    let deps = doc["dependencies"].as_array().unwrap();
    let of = |r: &str| -> BTreeSet<String> {
        deps.iter()
            .find(|d| d["ref"] == r)
            .unwrap_or_else(|| panic!("{r} has no dependency entry"))["dependsOn"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let signer = format!("meshward-signer@{version}");
    assert_eq!(
        of(&format!("container:meshward-signer@{version}")),
        BTreeSet::from([format!("meshward-playground@{version}"), signer.clone()])
    );
    // The signer's direct dependencies are its manifest's.
    let direct: BTreeSet<String> = of(&signer)
        .iter()
        .map(|r| r.rsplit_once('@').unwrap().0.to_string())
        .collect();
    assert_eq!(direct, manifest_dependencies("signer"));
    assert_eq!(
        of(&format!("meshward-playground@{version}"))
            .iter()
            .map(|r| r.rsplit_once('@').unwrap().0.to_string())
            .collect::<BTreeSet<_>>(),
        manifest_dependencies("playground")
    );
    assert_eq!(deps.len(), listed.len() + 1);
}

#[test]
fn cargo_tree_listing_is_read_with_its_edges_and_repeats() {
    let tree = "0app v0.1.0 (/src/app)\tApache-2.0\n\
                1serde v1.0.0\tMIT OR Apache-2.0\n\
                2serde_derive v1.0.0 (proc-macro)\tMIT OR Apache-2.0\n\
                3proc-macro2 v1.0.0\tMIT\n\
                1tokio v1.0.0\tMIT\n\
                2serde v1.0.0\tMIT OR Apache-2.0 (*)\n\
                2gitdep v0.2.0 (https://example.org/x#abc)\t\n";
    let listed = packages(tree).unwrap();
    let get = |r: &str| listed.iter().find(|p| p.reference() == r).unwrap();
    assert_eq!(listed.len(), 6);
    assert_eq!(
        get("app@0.1.0").depends_on,
        BTreeSet::from(["serde@1.0.0".to_string(), "tokio@1.0.0".to_string()])
    );
    assert_eq!(
        get("tokio@1.0.0").depends_on,
        BTreeSet::from(["serde@1.0.0".to_string(), "gitdep@0.2.0".to_string()])
    );
    assert_eq!(
        get("serde@1.0.0").depends_on,
        BTreeSet::from(["serde_derive@1.0.0".to_string()])
    );
    assert!(get("serde_derive@1.0.0").registry && get("serde@1.0.0").registry);
    assert!(!get("app@0.1.0").registry && !get("gitdep@0.2.0").registry);
    assert_eq!(get("gitdep@0.2.0").license, None);
    // A line deeper than its parent's next level is not cargo tree's.
    assert!(packages("0a v1\tMIT\n2b v1\tMIT\n").is_err());
    assert!(packages("").is_err());
}

#[test]
fn the_same_lockfile_gives_the_same_sbom_bytes() {
    let a = signer_image_sbom(&workspace(), "1.2.3").unwrap();
    let b = signer_image_sbom(&workspace(), "1.2.3").unwrap();
    assert_eq!(a, b);
    assert!(
        !String::from_utf8(a)
            .unwrap()
            .contains(env!("CARGO_MANIFEST_DIR"))
    );
}

#[test]
fn a_crates_io_package_without_a_pinned_checksum_is_refused() {
    // A crate whose bytes the lockfile does not pin cannot be vouched for.
    let package = Package {
        name: "serde".into(),
        version: "1.0.0".into(),
        license: Some("MIT OR Apache-2.0".into()),
        registry: true,
        depends_on: BTreeSet::new(),
    };
    let e = cyclonedx("img", "1", &[("img", vec![package])], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("no checksum for serde@1.0.0"), "{e}");
}
