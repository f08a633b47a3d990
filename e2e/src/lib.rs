//! meshward end-to-end: a proxy-wasm ABI v0.2.1 host on wasmtime, a
//! one-machine mTLS mesh around it, and the demo.

pub mod attributes;
pub mod demo;
pub mod envoy;
pub mod host;
pub mod mesh;
pub mod oci;
pub mod sbom;
pub mod wasm;
