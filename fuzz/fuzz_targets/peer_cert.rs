#![no_main]
//! See `meshward_fuzz::peer_cert`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::peer_cert::run(data));
