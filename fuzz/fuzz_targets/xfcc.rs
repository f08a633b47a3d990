#![no_main]
//! See `meshward_fuzz::xfcc`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshward_fuzz::xfcc::run(data));
