//! The filter as an OCI image, for `WasmPlugin.url: oci://…`.
//!
//! Istio's agent fetches a Wasm image and accepts three shapes
//! (`pkg/wasm/imagefetcher.go`, after solo.io's Wasm image spec). We write
//! the one every registry and copy tool handles as an ordinary image, the
//! *compat* variant: an OCI image manifest whose last (only) layer is an
//! `application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`.
//!
//! [`write_layout`] writes it as an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`), which `skopeo copy oci:DIR:TAG
//! docker://REGISTRY/…`, `oras cp --from-oci-layout` or `crane push` publish
//! unchanged. The image is reproducible: the same `.wasm` and tag always give
//! the same manifest digest — the value for the `WasmPlugin`'s `sha256`
//! field, which the agent checks after pulling.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The manifest's media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The image config's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The layer's media type (Istio's compat variant).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The index's media type.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The file in the layer Istio's agent looks for.
pub const PLUGIN_FILE: &str = "plugin.wasm";

/// What [`write_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The layout directory.
    pub layout: PathBuf,
    /// The tag it carries (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// `sha256:<hex>` of the manifest: the image digest.
    pub manifest_digest: String,
    /// The manifest's size in bytes.
    pub manifest_size: usize,
    /// `sha256:<hex>` of the `.wasm` itself (filter images; empty otherwise).
    pub wasm_digest: String,
}

/// Why the image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The input is not a WebAssembly module.
    #[error("not a WebAssembly module (no \\0asm header)")]
    NotWasm,
    /// The tag is not a valid OCI tag.
    #[error("tag {0:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")]
    Tag(String),
    /// The signer binary is not an ELF executable.
    #[error("not an ELF executable")]
    NotElf,
    /// The signer binary needs a dynamic loader the image does not have.
    #[error(
        "the binary is dynamically linked (it names a program interpreter); \
         build it for x86_64-unknown-linux-musl (scripts/signer-image)"
    )]
    Dynamic,
    /// A layer entry's path is not a short relative path.
    #[error("layer path {0:?} must be relative, without `..`, at most 99 bytes")]
    Path(String),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being written.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// One entry of a layer: a regular file, or a directory when `content` is
/// `None`.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Path inside the image, relative (`usr/local/bin/x`), at most 99 bytes.
    pub path: &'a str,
    /// Permission bits (e.g. `0o755`).
    pub mode: u32,
    /// The file's bytes; `None` for a directory.
    pub content: Option<&'a [u8]>,
}

/// One ustar header: owner 0:0, mtime 0 (so the archive depends on the
/// entries only).
fn ustar_header(path: &str, mode: u32, size: usize, directory: bool) -> [u8; 512] {
    let mut header = [0u8; 512];
    let mut field = |at: usize, value: &[u8]| {
        if let Some(slot) = header.get_mut(at..at + value.len()) {
            slot.copy_from_slice(value);
        }
    };
    // The name field holds 100 bytes, NUL-terminated when shorter.
    field(
        0,
        path.as_bytes()
            .get(..path.len().min(99))
            .unwrap_or_default(),
    );
    field(100, format!("{:07o}\0", mode & 0o7777).as_bytes());
    field(108, b"0000000\0");
    field(116, b"0000000\0");
    field(124, format!("{size:011o}\0").as_bytes());
    field(136, b"00000000000\0");
    field(156, if directory { b"5" } else { b"0" });
    field(257, b"ustar\0");
    field(263, b"00");
    // The checksum is computed with its own field as eight spaces.
    field(148, b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    if let Some(slot) = header.get_mut(148..156) {
        slot.copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
    header
}

/// A ustar archive of `entries` in order, each file's parent directories
/// first (mode 0755) when not listed before it.
pub fn tar(entries: &[Entry<'_>]) -> Result<Vec<u8>, OciError> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for e in entries {
        if e.path.len() > 99 || e.path.starts_with('/') || e.path.split('/').any(|c| c == "..") {
            return Err(OciError::Path(e.path.to_string()));
        }
        let parts: Vec<&str> = e.path.trim_end_matches('/').split('/').collect();
        for depth in 1..parts.len() {
            let dir = format!("{}/", parts.get(..depth).unwrap_or_default().join("/"));
            if seen.insert(dir.clone()) {
                out.extend_from_slice(&ustar_header(&dir, 0o755, 0, true));
            }
        }
        match e.content {
            None => {
                let dir = format!("{}/", e.path.trim_end_matches('/'));
                if seen.insert(dir.clone()) {
                    out.extend_from_slice(&ustar_header(&dir, e.mode, 0, true));
                }
            }
            Some(content) => {
                out.extend_from_slice(&ustar_header(e.path, e.mode, content.len(), false));
                out.extend_from_slice(content);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
    }
    // Two zero blocks end the archive.
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

/// A ustar archive holding one regular file, `name`, mode 0444.
pub fn single_file_tar(name: &str, content: &[u8]) -> Vec<u8> {
    tar(&[Entry {
        path: name,
        mode: 0o444,
        content: Some(content),
    }])
    .unwrap_or_default()
}

/// gzip of `bytes` with a fixed header (no name, mtime 0).
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

/// Write `wasm` as Istio's compat Wasm image tagged `tag` into the OCI
/// image layout `out` (created if missing; blobs already there are kept).
/// `source` and `version` become the manifest's `org.opencontainers.image.*`
/// annotations.
pub fn write_layout(
    wasm: &[u8],
    out: &Path,
    tag: &str,
    source: &str,
    version: &str,
) -> Result<Image, OciError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(OciError::NotWasm);
    }
    let layer = single_file_tar(PLUGIN_FILE, wasm);
    let mut image = write_image(
        &layer,
        PLUGIN_FILE,
        json!({"architecture": "wasm", "os": "wasip1", "config": {}}),
        &[
            ("org.opencontainers.image.source", source),
            ("org.opencontainers.image.version", version),
            (
                "org.opencontainers.image.description",
                "meshward filter: proxy-wasm plugin for Istio WasmPlugin (plugin.wasm)",
            ),
        ],
        out,
        tag,
    )?;
    image.wasm_digest = digest(wasm);
    Ok(image)
}

/// Write a one-layer image into the OCI image layout `out`: `layer_tar`
/// (gzip'd here) titled `title`, `config` (an image config without
/// `rootfs`, which is added), the manifest with `annotations`, and
/// `index.json` naming it `tag`.
pub fn write_image(
    layer_tar: &[u8],
    title: &str,
    mut config: serde_json::Value,
    annotations: &[(&str, &str)],
    out: &Path,
    tag: &str,
) -> Result<Image, OciError> {
    if !valid_tag(tag) {
        return Err(OciError::Tag(tag.to_string()));
    }
    let layer = gzip(layer_tar);
    if let Some(c) = config.as_object_mut() {
        c.insert(
            "rootfs".into(),
            json!({"type": "layers", "diff_ids": [digest(layer_tar)]}),
        );
        c.insert(
            "history".into(),
            json!([{"created_by": "meshward-e2e", "comment": title}]),
        );
    }
    let config = serde_json::to_vec(&config).unwrap_or_default();
    let annotations: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": digest(&config), "size": config.len()},
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": digest(&layer),
            "size": layer.len(),
            "annotations": {"org.opencontainers.image.title": title},
        }],
        "annotations": annotations,
    }))
    .unwrap_or_default();
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))
    .unwrap_or_default();

    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| OciError::Io { path, source }
    };
    let blobs = out.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    for blob in [&layer, &config, &manifest] {
        let path = blobs.join(digest(blob).trim_start_matches("sha256:"));
        std::fs::write(&path, blob).map_err(io(&path))?;
    }
    let layout = out.join("oci-layout");
    std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&layout))?;
    let index_path = out.join("index.json");
    std::fs::write(&index_path, index).map_err(io(&index_path))?;
    Ok(Image {
        layout: out.to_path_buf(),
        tag: tag.to_string(),
        manifest_digest,
        manifest_size: manifest.len(),
        wasm_digest: String::new(),
    })
}

/// Where the signer image keeps its files (the StatefulSet mounts the
/// config at `/etc/meshward/signer.toml`).
pub const SIGNER_BINARY: &str = "usr/local/bin/meshward-signer";
/// The dashboard's playground module in the signer image.
pub const SIGNER_PLAYGROUND: &str = "usr/share/meshward/meshward_playground.wasm";
/// The CA certificates the signer's outbound TLS (Vault, OIDC) may use.
pub const SIGNER_CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// Whether the 64-bit little-endian ELF `bytes` names a program
/// interpreter (`PT_INTERP`: it needs the host's dynamic loader and
/// libraries); `None` when it is not such an ELF file.
pub fn elf_interpreter(bytes: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if bytes.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// Write the signer's container image (linux/amd64, one layer) into the OCI
/// image layout `out`: the statically linked `binary`, the dashboard's
/// `playground` module, the `ca_bundle` (PEM) and the image's `sbom`
/// (CycloneDX JSON, [`crate::sbom`]) at `/usr/share/meshward/sbom.cdx.json`,
/// run as 65532:65532 with
/// `meshward-signer serve --config /etc/meshward/signer.toml` by default,
/// ports 15012 and 15014. Reproducible like [`write_layout`].
#[allow(clippy::too_many_arguments)]
pub fn write_signer_image(
    binary: &[u8],
    playground: &[u8],
    ca_bundle: &[u8],
    sbom: &[u8],
    out: &Path,
    tag: &str,
    source: &str,
    version: &str,
) -> Result<Image, OciError> {
    match elf_interpreter(binary) {
        None => return Err(OciError::NotElf),
        Some(true) => return Err(OciError::Dynamic),
        Some(false) => {}
    }
    if !playground.starts_with(b"\0asm") {
        return Err(OciError::NotWasm);
    }
    let layer = tar(&[
        Entry {
            path: SIGNER_BINARY,
            mode: 0o555,
            content: Some(binary),
        },
        Entry {
            path: SIGNER_PLAYGROUND,
            mode: 0o444,
            content: Some(playground),
        },
        Entry {
            path: SIGNER_CA_BUNDLE,
            mode: 0o444,
            content: Some(ca_bundle),
        },
        Entry {
            path: crate::sbom::SBOM_PATH,
            mode: 0o444,
            content: Some(sbom),
        },
        Entry {
            path: "etc/meshward",
            mode: 0o755,
            content: None,
        },
        Entry {
            path: "var/lib/meshward",
            mode: 0o755,
            content: None,
        },
        Entry {
            path: "tmp",
            mode: 0o1777,
            content: None,
        },
    ])?;
    write_image(
        &layer,
        "meshward-signer",
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": "65532:65532",
                "Entrypoint": [format!("/{SIGNER_BINARY}")],
                "Cmd": ["serve", "--config", "/etc/meshward/signer.toml"],
                "Env": [
                    "PATH=/usr/local/bin",
                    format!("SSL_CERT_FILE=/{SIGNER_CA_BUNDLE}"),
                ],
                "WorkingDir": "/",
                "ExposedPorts": {"15012/tcp": {}, "15014/tcp": {}},
                "Labels": {"org.opencontainers.image.source": source},
            },
        }),
        &[
            ("org.opencontainers.image.source", source),
            ("org.opencontainers.image.version", version),
            (
                "org.opencontainers.image.description",
                "meshward signer: Istio-compatible CA for SPIFFE workload certificates",
            ),
        ],
        out,
        tag,
    )
}

/// The largest `plugin.wasm` [`plugin_from_manifest`] unpacks.
pub const MAX_PLUGIN_BYTES: u64 = 64 << 20;

/// Read `plugin.wasm` out of an image the way Istio's agent does for the
/// compat variant: the manifest must be an OCI image manifest whose last
/// layer is a gzip'd tar; the first entry named `plugin.wasm` (any
/// directory) is the plugin. Every blob is checked against its
/// descriptor's digest and size, and the config's `diff_ids` against the
/// uncompressed layer. `blob` fetches a blob by digest.
pub fn plugin_from_manifest(
    manifest: &[u8],
    blob: impl Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    use std::io::Read as _;

    let m: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("manifest: {e}"))?;
    if *at(&m, "/schemaVersion") != 2 || *at(&m, "/mediaType") != MANIFEST_MEDIA_TYPE {
        return Err(format!("not an OCI image manifest: {m}"));
    }
    let fetch = |descriptor: &serde_json::Value| -> Result<Vec<u8>, String> {
        let want = at(descriptor, "/digest")
            .as_str()
            .ok_or("descriptor without a digest")?;
        let bytes = blob(want)?;
        if digest(&bytes) != want {
            return Err(format!("blob {want} has digest {}", digest(&bytes)));
        }
        let size = at(descriptor, "/size");
        if size.as_u64() != Some(bytes.len() as u64) {
            return Err(format!("blob {want} is {} bytes, not {size}", bytes.len()));
        }
        Ok(bytes)
    };
    let config: serde_json::Value =
        serde_json::from_slice(&fetch(at(&m, "/config"))?).map_err(|e| format!("config: {e}"))?;
    let layers = at(&m, "/layers")
        .as_array()
        .ok_or("manifest without layers")?;
    let last = layers
        .last()
        .ok_or("number of layers must be greater than zero")?;
    if *at(last, "/mediaType") != LAYER_MEDIA_TYPE {
        return Err(format!(
            "invalid layer media type {}",
            at(last, "/mediaType")
        ));
    }
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(fetch(last)?.as_slice())
        .take(MAX_PLUGIN_BYTES + (1 << 20))
        .read_to_end(&mut tar)
        .map_err(|e| format!("layer is not gzip: {e}"))?;
    let diff_ids = at(&config, "/rootfs/diff_ids")
        .as_array()
        .ok_or("config without diff_ids")?;
    if diff_ids.last().and_then(|d| d.as_str()) != Some(digest(&tar).as_str()) {
        return Err("config diff_ids do not match the layer".into());
    }
    tar_entry(&tar, PLUGIN_FILE)
}

/// `v` at the JSON pointer `path`; null when absent.
fn at<'a>(v: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    v.pointer(path).unwrap_or(&serde_json::Value::Null)
}

/// The content of the first entry of the ustar archive `tar` whose file
/// name (any directory) is `file`.
fn tar_entry(tar: &[u8], file: &str) -> Result<Vec<u8>, String> {
    let mut offset = 0usize;
    while let Some(header) = tar.get(offset..offset + 512) {
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let raw_name = header.get(..100).unwrap_or_default();
        let name_end = raw_name.iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(raw_name.get(..name_end).unwrap_or_default());
        let size_text = String::from_utf8_lossy(header.get(124..136).unwrap_or_default());
        let size = u64::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .map_err(|e| format!("tar entry {name}: size {size_text:?}: {e}"))?;
        let start = offset + 512;
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| start.checked_add(size))
            .filter(|&end| end <= tar.len())
            .ok_or_else(|| format!("tar entry {name} runs past the archive"))?;
        if Path::new(name.as_ref()).file_name() == Some(std::ffi::OsStr::new(file)) {
            if size > MAX_PLUGIN_BYTES {
                return Err(format!("{file} is {size} bytes"));
            }
            return Ok(tar.get(start..end).unwrap_or_default().to_vec());
        }
        offset = start + (end - start).div_ceil(512) * 512;
    }
    Err(format!("{file} not found in the archive"))
}

/// [`plugin_from_manifest`] for the image tagged `tag` in the layout `dir`.
pub fn plugin_from_layout(dir: &Path, tag: &str) -> Result<Vec<u8>, String> {
    let read = |path: PathBuf| std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()));
    let index: serde_json::Value = serde_json::from_slice(&read(dir.join("index.json"))?)
        .map_err(|e| format!("index.json: {e}"))?;
    let entry = at(&index, "/manifests")
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|d| *at(d, "/annotations/org.opencontainers.image.ref.name") == tag)
        })
        .ok_or_else(|| format!("no manifest tagged {tag} in index.json"))?;
    let blob = |d: &str| {
        let hex = d
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("digest {d}"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("digest {d}"));
        }
        read(dir.join("blobs").join("sha256").join(hex))
    };
    let want = at(entry, "/digest")
        .as_str()
        .ok_or("index entry without a digest")?;
    let manifest = blob(want)?;
    if digest(&manifest) != want {
        return Err(format!("manifest {want} has digest {}", digest(&manifest)));
    }
    plugin_from_manifest(&manifest, blob)
}

#[cfg(test)]
mod tests;
