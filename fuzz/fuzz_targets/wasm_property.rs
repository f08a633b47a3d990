#![no_main]
//! See `meshward_fuzz::wasm_property`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::wasm_property::run(data));
