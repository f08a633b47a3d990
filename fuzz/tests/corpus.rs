//! Replays every committed input (seeds and the regressions of crashes the
//! fuzzers found) through the targets' bodies, without libFuzzer:
//! `cargo test --manifest-path fuzz/Cargo.toml -p meshward-fuzz --no-default-features`.
//! (`scripts/fuzz` replays them too: each run starts from the corpus.)

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        let data = std::fs::read(&path).expect("a corpus file");
        eprintln!("{target}: {}", path.display());
        run(&data);
        n += 1;
    }
    assert!(n > 0, "{target} has no committed inputs");
}

#[test]
fn csr_corpus() {
    replay("csr", meshward_fuzz::csr::run);
}

#[test]
fn jwt_corpus() {
    replay("jwt", meshward_fuzz::jwt::run);
}

#[test]
fn filter_config_corpus() {
    replay("filter_config", meshward_fuzz::filter_config::run);
}

#[test]
fn xfcc_corpus() {
    replay("xfcc", meshward_fuzz::xfcc::run);
}

#[test]
fn peer_cert_corpus() {
    replay("peer_cert", meshward_fuzz::peer_cert::run);
}

#[test]
fn wasm_property_corpus() {
    replay("wasm_property", meshward_fuzz::wasm_property::run);
}

#[test]
fn vault_response_corpus() {
    replay("vault_response", meshward_fuzz::vault_response::run);
}
