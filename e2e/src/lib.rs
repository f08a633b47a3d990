//! meshward end-to-end: the one-machine mesh on real Envoy 1.40 (`envoy`),
//! the demo, images; and a proxy-wasm ABI v0.2.1 host on wasmtime (`host`),
//! kept only for the ABI fault-injection tests and the in-process wasm bench.

pub mod attributes;
pub mod demo;
pub mod envoy;
pub mod host;
pub mod mesh;
pub mod oci;
pub mod sbom;
pub mod wasm;
