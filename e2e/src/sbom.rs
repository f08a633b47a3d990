//! A CycloneDX 1.5 software bill of materials for the signer image: every
//! crate the signer binary and the playground module are built from, as
//! Cargo resolved them for the image's targets, with the crates.io checksum
//! `Cargo.lock` pins for each, their licenses and who depends on whom.
//!
//! The packages come from `cargo tree --package <root> --target <target>
//! --edges normal`: the features resolved for that package alone, as
//! `cargo build -p` builds it (the workspace-wide `cargo metadata` graph
//! also holds what only other members enable), normal dependencies only
//! (what is compiled into the artifact; build scripts and dev-dependencies
//! are not in it). The checksums come from `Cargo.lock`. The document has no timestamp or random
//! serial number and its lists are sorted, so the same lockfile gives the
//! same bytes and the image stays reproducible.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

/// Where the image carries it.
pub const SBOM_PATH: &str = "usr/share/meshward/sbom.cdx.json";

/// Why no SBOM was made.
#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    /// `cargo metadata` could not be run or failed.
    #[error("cargo metadata: {0}")]
    Cargo(String),
    /// Its output or `Cargo.lock` is not what Cargo writes.
    #[error("{0}")]
    Malformed(String),
}

/// A package the artifact is built from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    /// Crate name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// SPDX license expression, as its manifest says.
    pub license: Option<String>,
    /// From crates.io (else a workspace or path package).
    pub registry: bool,
    /// The names@versions it depends on (normal dependencies).
    pub depends_on: BTreeSet<String>,
}

impl Package {
    /// `name@version`, the package's reference in the document.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Runs `cargo tree` for `package` of the workspace of `manifest` on
/// `target`: normal dependencies, features resolved for that package as
/// `cargo build -p` resolves them, one line per package with its depth,
/// `name vVERSION[ (source)]`, a tab and its license.
pub fn cargo_tree(manifest: &Path, package: &str, target: &str) -> Result<String, SbomError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--locked", "--edges", "normal", "--prefix", "depth"])
        .args([
            "--format",
            "{p}\t{l}",
            "--package",
            package,
            "--target",
            target,
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .output()
        .map_err(|e| SbomError::Cargo(e.to_string()))?;
    if !out.status.success() {
        return Err(SbomError::Cargo(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| SbomError::Cargo(format!("output: {e}")))
}

/// The packages in a [`cargo_tree`] listing, with their edges. A package
/// shown again (`(*)`) is the same package; its dependencies were listed
/// where it first appeared.
pub fn packages(tree: &str) -> Result<Vec<Package>, SbomError> {
    let malformed = |line: &str| SbomError::Malformed(format!("cargo tree line {line:?}"));
    let mut by_ref: BTreeMap<String, Package> = BTreeMap::new();
    // The package at each depth on the way down to the current line.
    let mut path: Vec<String> = Vec::new();
    for line in tree.lines().filter(|l| !l.trim().is_empty()) {
        let line = line.strip_suffix(" (*)").unwrap_or(line);
        let digits = line.bytes().take_while(u8::is_ascii_digit).count();
        let (depth, rest) = line.split_at(digits);
        let depth: usize = depth.parse().map_err(|_| malformed(line))?;
        let (spec, license) = rest.split_once('\t').ok_or_else(|| malformed(line))?;
        let mut words = spec.split(' ');
        let name = words
            .next()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| malformed(line))?;
        let version = words
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .ok_or_else(|| malformed(line))?;
        // What follows is `(proc-macro)` and/or where a non-registry
        // package comes from: `(/path)`, `(https://…#rev)`.
        let registry = words.all(|w| w == "(proc-macro)");
        let package = Package {
            name: name.to_string(),
            version: version.to_string(),
            license: Some(license.trim())
                .filter(|l| !l.is_empty())
                .map(str::to_string),
            registry,
            depends_on: BTreeSet::new(),
        };
        let reference = package.reference();
        if depth > path.len() {
            return Err(malformed(line));
        }
        path.truncate(depth);
        if let Some(parent) = path.last().and_then(|p| by_ref.get_mut(p)) {
            parent.depends_on.insert(reference.clone());
        }
        by_ref.entry(reference.clone()).or_insert(package);
        path.push(reference);
    }
    if by_ref.is_empty() {
        return Err(SbomError::Malformed("cargo tree listed no package".into()));
    }
    Ok(by_ref.into_values().collect())
}

/// `name@version` → SHA-256 checksum, from `Cargo.lock`'s registry packages.
pub fn lock_checksums(lock: &str) -> Result<BTreeMap<String, String>, SbomError> {
    let lock: toml::Value =
        toml::from_str(lock).map_err(|e| SbomError::Malformed(format!("Cargo.lock: {e}")))?;
    let mut out = BTreeMap::new();
    for p in lock
        .get("package")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = |k: &str| p.get(k).and_then(toml::Value::as_str);
        if let (Some(name), Some(version), Some(sum)) =
            (field("name"), field("version"), field("checksum"))
        {
            out.insert(format!("{name}@{version}"), sum.to_string());
        }
    }
    Ok(out)
}

fn purl(p: &Package) -> String {
    format!("pkg:cargo/{}@{}", p.name, p.version)
}

/// The CycloneDX 1.5 document for a container image named `image` at
/// `version` holding the `artifacts` (root package → its packages).
/// Every crates.io package must have a checksum in `checksums`.
pub fn cyclonedx(
    image: &str,
    version: &str,
    artifacts: &[(&str, Vec<Package>)],
    checksums: &BTreeMap<String, String>,
) -> Result<Value, SbomError> {
    let mut all: BTreeMap<String, &Package> = BTreeMap::new();
    for (_, packages) in artifacts {
        for p in packages {
            all.insert(p.reference(), p);
        }
    }
    let roots: BTreeSet<&str> = artifacts.iter().map(|(root, _)| *root).collect();
    let mut components = Vec::new();
    for (reference, p) in &all {
        let mut c = serde_json::Map::new();
        let kind = if roots.contains(p.name.as_str()) {
            "application"
        } else {
            "library"
        };
        c.insert("type".into(), json!(kind));
        c.insert("bom-ref".into(), json!(reference));
        c.insert("name".into(), json!(p.name));
        c.insert("version".into(), json!(p.version));
        c.insert("purl".into(), json!(purl(p)));
        if let Some(license) = &p.license {
            c.insert("licenses".into(), json!([{ "expression": license }]));
        }
        if p.registry {
            let sum = checksums.get(reference).ok_or_else(|| {
                SbomError::Malformed(format!("Cargo.lock has no checksum for {reference}"))
            })?;
            c.insert(
                "hashes".into(),
                json!([{ "alg": "SHA-256", "content": sum }]),
            );
        }
        components.push(Value::Object(c));
    }
    // Not `name@version` like the packages: the image and its signer
    // binary share a name and a version.
    let image_ref = format!("container:{image}@{version}");
    let mut dependencies = vec![json!({
        "ref": image_ref,
        "dependsOn": artifacts
            .iter()
            .filter_map(|(root, packages)| packages.iter().find(|p| p.name == *root))
            .map(Package::reference)
            .collect::<BTreeSet<_>>(),
    })];
    for (reference, p) in &all {
        dependencies.push(json!({ "ref": reference, "dependsOn": p.depends_on }));
    }
    Ok(json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "component": {
                "type": "container",
                "bom-ref": image_ref,
                "name": image,
                "version": version,
            },
            "tools": {
                "components": [{
                    "type": "application",
                    "name": "meshward-e2e signer-image",
                    "version": env!("CARGO_PKG_VERSION"),
                }],
            },
        },
        "components": components,
        "dependencies": dependencies,
    }))
}

/// The signer image's SBOM, from the workspace at `workspace_root`: the
/// signer for x86_64-unknown-linux-musl and the playground for
/// wasm32-unknown-unknown.
pub fn signer_image_sbom(workspace_root: &Path, version: &str) -> Result<Vec<u8>, SbomError> {
    let manifest = workspace_root.join("Cargo.toml");
    let lock = std::fs::read_to_string(workspace_root.join("Cargo.lock"))
        .map_err(|e| SbomError::Malformed(format!("Cargo.lock: {e}")))?;
    let signer = packages(&cargo_tree(
        &manifest,
        "meshward-signer",
        "x86_64-unknown-linux-musl",
    )?)?;
    let playground = packages(&cargo_tree(
        &manifest,
        "meshward-playground",
        "wasm32-unknown-unknown",
    )?)?;
    let doc = cyclonedx(
        "meshward-signer",
        version,
        &[
            ("meshward-signer", signer),
            ("meshward-playground", playground),
        ],
        &lock_checksums(&lock)?,
    )?;
    let mut bytes = serde_json::to_vec_pretty(&doc)
        .map_err(|e| SbomError::Malformed(format!("serializing: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[cfg(test)]
mod tests;
