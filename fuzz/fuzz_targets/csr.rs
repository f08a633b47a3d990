#![no_main]
//! See `meshward_fuzz::csr`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::csr::run(data));
