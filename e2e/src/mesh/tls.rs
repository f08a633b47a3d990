//! rustls plumbing for callers that dial a sidecar with mTLS themselves: the
//! certificate they present and a server verifier that checks the chain
//! against the mesh's roots and the peer's SPIFFE ID instead of a DNS name.

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::attributes::first_uri_san;

/// The crypto provider used everywhere in the mesh.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate a sidecar presents now; swapped on rotation.
#[derive(Debug, Default)]
pub struct CurrentCert {
    inner: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CurrentCert {
    /// Replaces the certificate.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        match self.inner.write() {
            Ok(mut g) => *g = Some(key),
            Err(p) => *p.into_inner() = Some(key),
        }
    }

    /// The current certificate.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// The certificates of a PEM bundle, in order.
pub fn root_ders(roots_pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::pem_slice_iter(roots_pem.as_bytes()).collect::<Result<_, _>>()?)
}

/// Roots from a PEM bundle.
pub fn root_store(roots_pem: &str) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in root_ders(roots_pem)? {
        store.add(cert)?;
    }
    anyhow::ensure!(!store.is_empty(), "no root certificate in the trust bundle");
    Ok(store)
}

/// Client TLS config presenting the current certificate and verifying the
/// server by chain and SPIFFE ID.
pub fn client_config(
    roots: Arc<RootCertStore>,
    cert: Arc<CurrentCert>,
    expected_server: Option<String>,
) -> anyhow::Result<rustls::ClientConfig> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            roots,
            expected: expected_server,
        }))
        .with_client_cert_resolver(cert);
    Ok(config)
}

/// Verifies a server's chain against the mesh roots for server auth, and
/// its URI SAN against the expected SPIFFE ID (when one is given) — what
/// Envoy does with `match_subject_alt_names` in an Istio mesh.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Option<String>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate chain: {e}")))?;
        if let Some(expected) = &self.expected {
            let got = first_uri_san(end_entity.as_ref());
            if got.as_deref() != Some(expected.as_str()) {
                return Err(rustls::Error::General(format!(
                    "server identity {got:?} is not the expected {expected}"
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
