//! The fuzz targets' bodies, one module per target, so `fuzz_targets/*.rs`
//! stay one line and `tests/corpus.rs` can replay every committed input on a
//! stable toolchain.
//!
//! Every body refuses nothing by panicking: a panic, an abort or an overflow
//! (the targets are built with debug assertions) is the crash libFuzzer
//! reports. Where the code under test promises more than "no panic", the
//! body checks it with `assert!` against an independent reading of the same
//! input (x509-parser, the spiffe crate, the filter's linear reference
//! evaluator, a re-serialisation).
//!
//! Inputs with several parts separate them with [`SEP`]; the fixtures
//! (`fixtures/`, written by `seedgen`) are fixed keys and certificates, so
//! the committed seeds stay valid from run to run.

pub mod csr;
pub mod der;
pub mod filter_config;
pub mod jwt;
pub mod peer_cert;
pub mod vault_response;
pub mod wasm_property;
pub mod xfcc;

pub mod fixture;
pub use fixture::*;

/// The parts of `data` between [`SEP`]s, at most `max` (the last part keeps
/// any further separators).
pub fn parts(data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < max {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// Runs a future that must not wait on anything (the signer's verification
/// with a static key set): one poll, and a future that is not ready then is
/// a harness error.
pub fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a static-key verification waited"),
    }
}

/// A `PeerCert` with this validity and source, and every other field (the
/// filter may grow some) as the filter itself sets it for a certificate
/// read from XFCC.
pub fn peer_cert(
    validity: meshward_filter::CertValidity,
    source: meshward_filter::CertSource,
) -> meshward_filter::PeerCert {
    static TEMPLATE: std::sync::OnceLock<meshward_filter::PeerCert> = std::sync::OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        let der = vault_response::ROOT_DER;
        let text = pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
        let header = format!(
            "Cert=\"{}\"",
            percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
        );
        meshward_filter::xfcc::peer_cert_from_xfcc(&header, &meshward_filter::cert::sha256_hex(der))
            .expect("the fixture root reads")
            .expect("and matches its digest")
    });
    #[allow(clippy::needless_update)]
    meshward_filter::PeerCert {
        validity,
        source,
        ..*template
    }
}
