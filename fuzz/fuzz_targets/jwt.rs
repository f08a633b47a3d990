#![no_main]
//! See `meshward_fuzz::jwt`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::jwt::run(data));
