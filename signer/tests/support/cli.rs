//! The `meshward-signer` binary built for these tests, run as an operator
//! would run it.
#![allow(clippy::unwrap_used, dead_code)]

/// Runs `meshward-signer <args>`; whether it succeeded, and what it printed
/// (stdout, then stderr). Backtraces are off so errors read as an operator
/// sees them.
pub fn signer_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshward-signer"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap();
    (out.status.success(), text)
}
