//! Where the filter's `.wasm` is.

use std::path::PathBuf;

/// `MESHWARD_FILTER_WASM`, else `target/meshward_filter.wasm` in the repo.
pub fn filter_wasm_path() -> PathBuf {
    match std::env::var_os("MESHWARD_FILTER_WASM") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/meshward_filter.wasm"
        )),
    }
}

/// Reads the filter's `.wasm`, or says how to build it.
pub fn read_filter_wasm() -> anyhow::Result<Vec<u8>> {
    let path = filter_wasm_path();
    std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the filter at {}: {e}; build it with `scripts/wasm` \
             (scripts/test does this first) or set MESHWARD_FILTER_WASM",
            path.display()
        )
    })
}
