//! The gRPC serving certificate, issued by the signer's own CA through the
//! same [`Issuer`] seam as workload certificates, and kept current while the
//! signer runs.
//!
//! The certificate is served through [`ServingCertResolver`], which rustls
//! asks on every handshake. [`spawn_serving_renewal`] re-issues it when the
//! issuer's roots or signing CA change (a root rotation switch or retirement,
//! a `cacerts` reload: agents that trust only the new root must be able to
//! verify the signer) and when 2/3 of its lifetime has passed. Until a new
//! certificate is issued the old one keeps being served.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::issuer::{IssueRequest, Issuer, KeyKind};
use crate::metrics::Metrics;

use super::tls::{TlsError, certified_key};

use super::ca_service::to_pem;

/// A serving certificate chain (leaf + intermediates, PEM) and its key (PEM).
#[derive(Debug, Clone)]
pub struct ServingIdentity {
    /// Leaf then intermediates.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// When it was issued (the `now` it was asked for).
    pub issued_at: OffsetDateTime,
    /// notAfter of the leaf.
    pub not_after: OffsetDateTime,
}

impl ServingIdentity {
    /// When it should be replaced: after 2/3 of the time from issuance to
    /// notAfter, and never sooner than one second after issuance (a
    /// signing CA at or past its end would otherwise make every check
    /// renew).
    pub fn renew_at(&self) -> OffsetDateTime {
        let life: time::Duration = self.not_after - self.issued_at;
        let wait: time::Duration = life * 2 / 3;
        self.issued_at + wait.max(time::Duration::seconds(1))
    }
}

/// Why a serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// Key generation failed.
    #[error("serving key: {0}")]
    Key(String),
    /// A DNS name or the signer's SPIFFE ID is invalid.
    #[error("serving certificate name: {0}")]
    Name(String),
    /// The issuer failed.
    #[error("serving certificate: {0}")]
    Issue(#[from] crate::issuer::IssueError),
    /// The issued chain or key is unusable for TLS.
    #[error("serving certificate for TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Issue a serving certificate for `dns_names`, with the signer's own SPIFFE
/// ID `spiffe://<td>/ns/istio-system/sa/meshward-signer`, valid for `ttl`
/// (within the issuer's window).
pub async fn issue_serving_identity(
    issuer: &dyn Issuer,
    trust_domain: &TrustDomain,
    dns_names: &[String],
    ttl: std::time::Duration,
    now: OffsetDateTime,
) -> Result<ServingIdentity, ServingError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    let spiffe_id = SpiffeId::from_segments(
        trust_domain.clone(),
        &["ns", "istio-system", "sa", "meshward-signer"],
    )
    .map_err(|e| ServingError::Name(e.to_string()))?;
    let signing = issuer.signing_validity();
    let not_before = (now - time::Duration::minutes(1)).max(signing.not_before);
    let not_after = (now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(30)))
        .min(signing.not_after);
    let mut params = rcgen::CertificateParams::new(dns_names.to_vec())
        .map_err(|e| ServingError::Name(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(spiffe_id.to_string())
        .map_err(|e| ServingError::Name(e.to_string()))?;
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    let req = IssueRequest {
        csr_der: csr.der().to_vec(),
        spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_kind: KeyKind::EcdsaP256,
        spiffe_id,
        dns_names: dns_names.to_vec(),
        not_before,
        not_after,
    };
    let chain = issuer.sign(&req).await?;
    let mut chain_pem = to_pem(&chain.leaf);
    for c in &chain.intermediates {
        chain_pem.push_str(&to_pem(c));
    }
    Ok(ServingIdentity {
        chain_pem,
        key_pem: key.serialize_pem(),
        issued_at: now,
        not_after,
    })
}

/// A digest of what an issuer signs with and what it tells clients to trust
/// (trust anchors + signing CA validity). It changes when a root rotation
/// switches or retires a root and when a `cacerts` reload brings new files;
/// the serving certificate is re-issued when it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuerFingerprint([u8; 32]);

impl IssuerFingerprint {
    /// The fingerprint of `issuer` as it is now.
    pub fn of(issuer: &dyn Issuer) -> Self {
        let mut h = Sha256::new();
        for a in issuer.trust_anchors() {
            h.update((a.len() as u64).to_be_bytes());
            h.update(a.as_ref());
        }
        let v = issuer.signing_validity();
        h.update(v.not_before.unix_timestamp().to_be_bytes());
        h.update(v.not_after.unix_timestamp().to_be_bytes());
        Self(h.finalize().into())
    }
}

/// Why the serving certificate is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewReason {
    /// The issuer's roots or signing CA changed.
    IssuerChanged,
    /// 2/3 of its lifetime has passed.
    Lifetime,
}

impl std::fmt::Display for RenewReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RenewReason::IssuerChanged => "the CA roots or signing certificate changed",
            RenewReason::Lifetime => "2/3 of its lifetime has passed",
        })
    }
}

/// Whether the serving certificate `current`, issued while the issuer had
/// fingerprint `issued_under`, must be replaced at `now` given the issuer's
/// fingerprint is now `issuer_now`.
pub fn renewal_due(
    current: &ServingIdentity,
    issued_under: IssuerFingerprint,
    issuer_now: IssuerFingerprint,
    now: OffsetDateTime,
) -> Option<RenewReason> {
    if issued_under != issuer_now {
        Some(RenewReason::IssuerChanged)
    } else if now >= current.renew_at() {
        Some(RenewReason::Lifetime)
    } else {
        None
    }
}

/// The first wait after a failed renewal; doubled per failure up to
/// [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between renewal attempts after failures.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// How long to wait after `failures` consecutive failed renewals.
pub fn retry_after(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(
            1u32.checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(RETRY_MAX)
}

/// Hands rustls the current serving certificate on every handshake.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCertResolver {
    /// Serve `identity`.
    pub fn new(identity: &ServingIdentity) -> Result<Self, ServingError> {
        Ok(Self {
            current: RwLock::new(Arc::new(certified_key(
                &identity.chain_pem,
                &identity.key_pem,
            )?)),
        })
    }

    /// Serve `identity` from the next handshake on. On error the old
    /// certificate stays.
    pub fn replace(&self, identity: &ServingIdentity) -> Result<(), ServingError> {
        let key = Arc::new(certified_key(&identity.chain_pem, &identity.key_pem)?);
        match self.current.write() {
            Ok(mut cur) => *cur = key,
            // A writer never panics while holding the lock, but do not
            // depend on it: take the lock back and replace.
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        Ok(())
    }

    /// The certified key served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What the serving certificate is issued for.
#[derive(Debug, Clone)]
pub struct ServingParams {
    /// The signer's trust domain.
    pub trust_domain: TrustDomain,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Requested lifetime.
    pub ttl: Duration,
}

/// Keep the serving certificate in `resolver` current until `shutdown`:
/// every `check_interval` (and whenever `wake` changes, e.g. the trust
/// bundle) compare the issuer's fingerprint with the one the current
/// certificate was issued under, and re-issue on a change or at 2/3 of the
/// certificate's lifetime. Failures are logged and retried with backoff;
/// the old certificate is served meanwhile. The CA expiry gauge in
/// `metrics` follows the issuer.
#[allow(clippy::too_many_arguments)]
pub fn spawn_serving_renewal(
    issuer: Arc<dyn Issuer>,
    params: ServingParams,
    resolver: Arc<ServingCertResolver>,
    metrics: Arc<Metrics>,
    initial: ServingIdentity,
    issued_under: IssuerFingerprint,
    check_interval: Duration,
    mut wake: Option<watch::Receiver<Arc<crate::bundle::TrustBundle>>>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let mut current = initial;
        let mut issued_under = issued_under;
        let mut failures: u32 = 0;
        let check_interval = check_interval.max(Duration::from_millis(10));
        loop {
            let wait = if failures > 0 {
                retry_after(failures)
            } else {
                let until_renew = current.renew_at() - OffsetDateTime::now_utc();
                let until_renew = Duration::try_from(until_renew).unwrap_or(Duration::ZERO);
                check_interval.min(until_renew)
            };
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
                changed = async {
                    match wake.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        wake = None;
                    }
                }
            }
            let now = OffsetDateTime::now_utc();
            let fingerprint = IssuerFingerprint::of(issuer.as_ref());
            let Some(reason) = renewal_due(&current, issued_under, fingerprint, now) else {
                continue;
            };
            let renewed = match issue_serving_identity(
                issuer.as_ref(),
                &params.trust_domain,
                &params.dns_names,
                params.ttl,
                now,
            )
            .await
            {
                Ok(identity) => resolver.replace(&identity).map(|()| identity),
                Err(e) => Err(e),
            };
            match renewed {
                Ok(identity) => {
                    let ca_not_after = issuer.signing_validity().not_after;
                    metrics.set_ca_expiry(ca_not_after.unix_timestamp());
                    tracing::info!(
                        %reason,
                        not_after = %identity.not_after,
                        %ca_not_after,
                        "renewed the gRPC serving certificate"
                    );
                    current = identity;
                    issued_under = fingerprint;
                    failures = 0;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        %reason,
                        error = %e,
                        retry_in = ?retry_after(failures),
                        "could not renew the gRPC serving certificate; still serving the old one"
                    );
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(issued_at: i64, not_after: i64) -> ServingIdentity {
        ServingIdentity {
            chain_pem: String::new(),
            key_pem: String::new(),
            issued_at: OffsetDateTime::from_unix_timestamp(issued_at).unwrap(),
            not_after: OffsetDateTime::from_unix_timestamp(not_after).unwrap(),
        }
    }

    fn at(t: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    #[test]
    fn serving_cert_is_renewed_at_two_thirds_of_its_life_not_at_expiry() {
        let id = identity(1_000, 4_000);
        let fp = IssuerFingerprint([1; 32]);
        assert_eq!(renewal_due(&id, fp, fp, at(2_999)), None);
        assert_eq!(
            renewal_due(&id, fp, fp, at(3_000)),
            Some(RenewReason::Lifetime)
        );
    }

    #[test]
    fn serving_cert_is_renewed_at_once_when_the_issuer_changes() {
        let id = identity(1_000, 4_000);
        assert_eq!(
            renewal_due(
                &id,
                IssuerFingerprint([1; 32]),
                IssuerFingerprint([2; 32]),
                at(1_001)
            ),
            Some(RenewReason::IssuerChanged)
        );
    }

    #[test]
    fn serving_cert_from_an_expired_ca_is_not_renewed_in_a_busy_loop() {
        let id = identity(1_000, 900);
        let fp = IssuerFingerprint([1; 32]);
        assert_eq!(renewal_due(&id, fp, fp, at(1_000)), None);
        assert_eq!(
            renewal_due(&id, fp, fp, at(1_001)),
            Some(RenewReason::Lifetime)
        );
    }

    #[test]
    fn failed_renewals_back_off_up_to_a_bound() {
        assert_eq!(retry_after(1), RETRY_MIN);
        assert_eq!(retry_after(2), RETRY_MIN * 2);
        assert_eq!(retry_after(40), RETRY_MAX);
        assert_eq!(retry_after(u32::MAX), RETRY_MAX);
    }
}
