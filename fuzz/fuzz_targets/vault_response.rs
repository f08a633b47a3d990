#![no_main]
//! See `meshward_fuzz::vault_response`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::vault_response::run(data));
