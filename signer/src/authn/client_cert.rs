//! mTLS renewal: a caller presenting a client certificate from this CA is
//! authenticated as the SPIFFE ID in it, with no token. The chain is
//! verified on every request (webpki, clientAuth EKU, validity at `now`)
//! against the issuer's trust anchors *at that moment* — so a long-lived
//! connection cannot outlive its certificate, and certificates under a new
//! root are accepted as soon as a rotation publishes it.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::TrustDomain;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::{AuthMethod, AuthnError, CallerIdentity};
use crate::issuer::Issuer;

/// Verifies client certificate chains against the signer's roots.
#[derive(Clone)]
pub struct ClientCertAuthenticator {
    trust_domain: TrustDomain,
    issuer: Arc<dyn Issuer>,
}

impl std::fmt::Debug for ClientCertAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertAuthenticator")
            .field("trust_domain", &self.trust_domain)
            .field("issuer", &self.issuer.name())
            .finish()
    }
}

impl ClientCertAuthenticator {
    /// Trust chains ending at `issuer`'s current trust anchors for
    /// identities in `trust_domain`.
    pub fn new(trust_domain: TrustDomain, issuer: Arc<dyn Issuer>) -> Self {
        Self {
            trust_domain,
            issuer,
        }
    }

    /// Verify `chain` (leaf first) at `now_unix` and return its identity.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'static>],
        now_unix: i64,
    ) -> Result<CallerIdentity, AuthnError> {
        let bad = |m: String| AuthnError::ClientCertificate(m);
        let (leaf_der, intermediates) = chain
            .split_first()
            .ok_or_else(|| bad("no certificate".to_string()))?;
        let roots = self.issuer.trust_anchors();
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|a| webpki::anchor_from_trusted_cert(a).ok())
            .collect();
        let leaf = webpki::EndEntityCert::try_from(leaf_der)
            .map_err(|e| bad(format!("unparseable: {e}")))?;
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now_unix).unwrap_or_default(),
        ));
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { not_after, .. } => bad(format!(
                "expired at {} (unix seconds); renew with a service-account token",
                not_after.as_secs()
            )),
            webpki::Error::CertNotValidYet { not_before, .. } => bad(format!(
                "not valid before {} (unix seconds)",
                not_before.as_secs()
            )),
            other => bad(format!("does not chain to this CA's roots: {other}")),
        })?;

        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf_der)
            .map_err(|e| bad(format!("unparseable: {e}")))?;
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(*u);
                    }
                }
            }
        }
        let [uri] = uris.as_slice() else {
            return Err(bad(format!(
                "{} URI SANs; exactly one SPIFFE ID is required",
                uris.len()
            )));
        };
        let id = crate::csr::canonical_spiffe_id(uri).map_err(|e| bad(e.to_string()))?;
        if id.trust_domain() != &self.trust_domain {
            return Err(bad(format!(
                "{id} is outside trust domain {}",
                self.trust_domain
            )));
        }
        let segments: Vec<&str> = id.path().split('/').skip(1).collect();
        let (ns, sa) = match segments.as_slice() {
            ["ns", ns, "sa", sa] => (*ns, *sa),
            _ => {
                return Err(bad(format!(
                    "{id} is not a Kubernetes workload identity (/ns/<ns>/sa/<sa>)"
                )));
            }
        };
        CallerIdentity::for_service_account(
            &self.trust_domain,
            ns,
            sa,
            AuthMethod::ClientCertificate,
        )
    }
}
