//! What a caller sees of the mesh: the certificate a sidecar holds and a
//! response.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The certificate a sidecar holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Leaf, DER.
    pub leaf: Vec<u8>,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// How many certificates this sidecar has had (1 = the first).
    pub generation: u64,
}

impl CertInfo {
    /// Reads a leaf's validity; `generation` counts the certificates held.
    pub fn parse(leaf: &[u8], generation: u64) -> anyhow::Result<Self> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) =
            X509Certificate::from_der(leaf).map_err(|e| anyhow::anyhow!("leaf: {e}"))?;
        let to_time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        Ok(Self {
            leaf: leaf.to_vec(),
            not_before: to_time(cert.validity().not_before.timestamp()),
            not_after: to_time(cert.validity().not_after.timestamp()),
            generation,
        })
    }

    /// Age at `now` (zero before notBefore).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.not_before).unwrap_or_default()
    }

    /// Remaining validity at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// A response seen by the caller.
#[derive(Debug, Clone)]
pub struct MeshResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// The certificate the caller presented.
    pub client_cert: Option<CertInfo>,
}

impl MeshResponse {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
