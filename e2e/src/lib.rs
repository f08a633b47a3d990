//! meshward end-to-end: proxy-wasm host, mesh simulation, demo.
