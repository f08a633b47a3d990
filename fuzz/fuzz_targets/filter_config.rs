#![no_main]
//! See `meshward_fuzz::filter_config`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::filter_config::run(data));
