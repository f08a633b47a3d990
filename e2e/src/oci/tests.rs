#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::*;

/// A small module: the header, then bytes that do not compress to nothing.
fn module(n: usize) -> Vec<u8> {
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend((0..n).map(|i| (i * 7919 % 251) as u8));
    wasm
}

const SOURCE: &str = "https://github.com/meshward/meshward";

#[test]
fn the_image_holds_plugin_wasm_where_istios_agent_looks() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(300_000);
    let image = write_layout(&wasm, dir.path(), "0.1.0", SOURCE, "0.1.0").unwrap();
    assert_eq!(plugin_from_layout(dir.path(), "0.1.0").unwrap(), wasm);
    assert_eq!(image.wasm_digest, digest(&wasm));
    assert!(image.manifest_digest.starts_with("sha256:"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    // Three blobs: layer, config, manifest.
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        3
    );
    assert!(plugin_from_layout(dir.path(), "0.2.0").is_err());
}

#[test]
fn the_same_module_always_gives_the_same_image_digest() {
    let wasm = module(10_000);
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = write_layout(&wasm, a.path(), "v1", SOURCE, "1").unwrap();
    let second = write_layout(&wasm, b.path(), "v1", SOURCE, "1").unwrap();
    assert_eq!(first.manifest_digest, second.manifest_digest);
    let other = write_layout(&module(10_001), b.path(), "v1", SOURCE, "1").unwrap();
    assert_ne!(first.manifest_digest, other.manifest_digest);
}

#[test]
fn the_layer_is_a_tar_gz_that_gnu_tar_reads() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(5_000);
    write_layout(&wasm, dir.path(), "t", SOURCE, "1").unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("blobs/sha256").join(manifest_hex)).unwrap(),
    )
    .unwrap();
    let layer = dir
        .path()
        .join("blobs/sha256")
        .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
    let listing = std::process::Command::new("tar")
        .arg("-tvzf")
        .arg(&layer)
        .output()
        .expect("tar runs");
    assert!(listing.status.success(), "{listing:?}");
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(listing.starts_with("-r--r--r-- 0/0"), "{listing}");
    assert!(listing.trim_end().ends_with(" plugin.wasm"), "{listing}");
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(out.path().join("plugin.wasm")).unwrap(), wasm);
}

#[test]
fn a_tampered_layer_is_refused_by_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(2_000);
    write_layout(&wasm, dir.path(), "t", SOURCE, "1").unwrap();
    let tar = single_file_tar(PLUGIN_FILE, &wasm);
    let layer = dir
        .path()
        .join("blobs/sha256")
        .join(&digest(&gzip(&tar))[7..]);
    let mut bytes = std::fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&layer, bytes).unwrap();
    let err = plugin_from_layout(dir.path(), "t").unwrap_err();
    assert!(err.contains("has digest"), "{err}");
}

#[test]
fn inputs_that_are_not_an_image_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        write_layout(b"<html>", dir.path(), "t", SOURCE, "1"),
        Err(OciError::NotWasm)
    ));
    for tag in ["", "-lead", "has space", "a/b", &"x".repeat(129)] {
        assert!(
            matches!(
                write_layout(&module(1), dir.path(), tag, SOURCE, "1"),
                Err(OciError::Tag(_))
            ),
            "{tag:?}"
        );
    }
    for tag in ["0.1.0", "latest", "v1_2-rc.3", "_x"] {
        assert!(valid_tag(tag), "{tag}");
    }
}

#[test]
fn long_and_odd_sized_files_round_trip_through_the_tar_writer() {
    for n in [0, 1, 511, 512, 513, 100_000] {
        let content = module(n);
        let tar = single_file_tar("dir/plugin.wasm", &content);
        assert_eq!(tar.len() % 512, 0);
        let layer = gzip(&tar);
        // A manifest-free check: walk it with the same reader.
        let config = serde_json::to_vec(&json!({"rootfs": {"diff_ids": [digest(&tar)]}})).unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": digest(&layer), "size": layer.len()}],
        }))
        .unwrap();
        let got = plugin_from_manifest(&manifest, |d| {
            if d == digest(&config) {
                Ok(config.clone())
            } else if d == digest(&layer) {
                Ok(layer.clone())
            } else {
                Err(format!("no blob {d}"))
            }
        })
        .unwrap();
        assert_eq!(got, content, "{n} bytes");
    }
}

#[test]
fn a_dynamically_linked_signer_is_refused_for_the_image() {
    // This test binary links glibc dynamically: the image has no loader.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(elf_interpreter(&me), Some(true));
    let dir = tempfile::tempdir().unwrap();
    let err =
        write_signer_image(&me, &module(10), b"", b"{}", dir.path(), "t", SOURCE, "1").unwrap_err();
    assert!(matches!(err, OciError::Dynamic), "{err}");
    assert!(matches!(
        write_signer_image(
            b"#!/bin/sh",
            &module(10),
            b"",
            b"{}",
            dir.path(),
            "t",
            SOURCE,
            "1"
        ),
        Err(OciError::NotElf)
    ));
    assert_eq!(
        elf_interpreter(b"\x7fELF\x02\x01"),
        None,
        "truncated header"
    );
}

#[test]
fn layer_entries_get_their_parent_directories_and_modes() {
    let layer = tar(&[
        Entry {
            path: "usr/local/bin/tool",
            mode: 0o555,
            content: Some(b"#!"),
        },
        Entry {
            path: "tmp",
            mode: 0o1777,
            content: None,
        },
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    std::fs::write(&file, &layer).unwrap();
    let listing = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&file)
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 5, "{listing}");
    assert!(
        lines[0].starts_with("drwxr-xr-x 0/0") && lines[0].ends_with(" usr/"),
        "{listing}"
    );
    assert!(lines[2].ends_with(" usr/local/bin/"), "{listing}");
    assert!(lines[3].starts_with("-r-xr-xr-x 0/0") && lines[3].ends_with(" usr/local/bin/tool"));
    assert!(
        lines[4].starts_with("drwxrwxrwt 0/0") && lines[4].ends_with(" tmp/"),
        "{listing}"
    );
    for bad in ["/etc/passwd", "a/../../etc", &"x".repeat(100)] {
        assert!(
            matches!(
                tar(&[Entry {
                    path: bad,
                    mode: 0o444,
                    content: Some(b"")
                }]),
                Err(OciError::Path(_))
            ),
            "{bad}"
        );
    }
}
