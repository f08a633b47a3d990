//! Who is on the other end of the connection, as the proxy verified it.
//!
//! Built only from connection facts (`connection.mtls`,
//! `connection.uri_san_peer_certificate`, the peer certificate), never from
//! request headers.

use crate::cert::PeerCert;
use spiffe::SpiffeId;

/// Longest SPIFFE ID the spec allows, in bytes.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

/// The verified identity of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// No client certificate (plaintext, or TLS without a client certificate).
    Plaintext,
    /// mTLS, but the certificate has no URI SAN.
    NoUriSan,
    /// mTLS with a URI SAN that is a valid SPIFFE ID.
    Spiffe(SpiffeIdentity),
    /// mTLS with a URI SAN that is not a valid SPIFFE ID: always denied.
    Invalid { uri: String, problem: String },
}

/// A validated SPIFFE ID plus the derived strings the policy matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeIdentity {
    id: SpiffeId,
    /// Istio's principal form: `<trust-domain><path>` (no `spiffe://`).
    principal: String,
    /// Byte range of the namespace inside `principal`, if the path has `/ns/<ns>`.
    namespace: Option<(usize, usize)>,
}

impl SpiffeIdentity {
    /// Parses and validates a SPIFFE ID (spec rules, at most 2048 bytes).
    pub fn parse(uri: &str) -> Result<Self, String> {
        if uri.len() > MAX_SPIFFE_ID_BYTES {
            return Err(format!("longer than {MAX_SPIFFE_ID_BYTES} bytes"));
        }
        let id = SpiffeId::new(uri).map_err(|e| e.to_string())?;
        if id.path().is_empty() {
            return Err("has no path (a trust domain is not a workload identity)".into());
        }
        let principal = format!("{}{}", id.trust_domain_name(), id.path());
        let td_len = id.trust_domain_name().len();
        let namespace = id.path().find("/ns/").and_then(|at| {
            let start = td_len + at + 4;
            let rest = principal.get(start..)?;
            let len = rest.find('/').unwrap_or(rest.len());
            (len > 0).then_some((start, start + len))
        });
        Ok(Self {
            id,
            principal,
            namespace,
        })
    }

    /// The SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// `<trust-domain>/<path>`, the string `principals` patterns match.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The trust domain (lower case).
    pub fn trust_domain(&self) -> &str {
        self.id.trust_domain_name()
    }

    /// The segment after the first `/ns/` of the path, as Istio derives
    /// `source.namespace` from a principal.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace
            .and_then(|(start, end)| self.principal.get(start..end))
    }
}

/// Everything the policy knows about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub mtls: bool,
    pub identity: PeerIdentity,
    /// Validity of the peer's leaf certificate, when some source knew it.
    pub cert: Option<PeerCert>,
}

impl Peer {
    /// Builds a peer from what the proxy reports about the connection.
    /// `uri_san` is ignored unless `mtls` is true.
    pub fn from_connection(mtls: bool, uri_san: Option<&str>, cert: Option<PeerCert>) -> Self {
        let identity = match (mtls, uri_san) {
            (false, _) => PeerIdentity::Plaintext,
            (true, None) => PeerIdentity::NoUriSan,
            (true, Some("")) => PeerIdentity::NoUriSan,
            (true, Some(uri)) => match SpiffeIdentity::parse(uri) {
                Ok(id) => PeerIdentity::Spiffe(id),
                Err(problem) => PeerIdentity::Invalid {
                    uri: uri.chars().take(256).collect(),
                    problem,
                },
            },
        };
        Self {
            mtls,
            identity,
            cert: if mtls { cert } else { None },
        }
    }

    /// The SPIFFE identity, if the peer has a valid one.
    pub fn spiffe(&self) -> Option<&SpiffeIdentity> {
        match &self.identity {
            PeerIdentity::Spiffe(id) => Some(id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_identity_yields_principal_namespace_and_trust_domain() {
        let id = SpiffeIdentity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.trust_domain(), "cluster.local");
        let other = SpiffeIdentity::parse("spiffe://example.org/billing").unwrap();
        assert_eq!(other.namespace(), None);
    }

    #[test]
    fn non_canonical_spiffe_ids_are_invalid_peers() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/%61/sa/b",
            "spiffe://cluster.local:443/ns/a",
            "spiffe://user@cluster.local/ns/a",
            "spiffe://cluster.local/ns/a?x=1",
            "spiffe://cluster.local/ns/a#f",
            "spiffe://cluster.local//a",
            "spiffe://cluster.local",
            "spiffe:///ns/a",
        ] {
            let p = Peer::from_connection(true, Some(bad), None);
            assert!(matches!(p.identity, PeerIdentity::Invalid { .. }), "{bad}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2040));
        assert!(matches!(
            Peer::from_connection(true, Some(&long), None).identity,
            PeerIdentity::Invalid { .. }
        ));
    }

    #[test]
    fn uri_san_without_mtls_is_not_an_identity() {
        let p = Peer::from_connection(false, Some("spiffe://cluster.local/ns/a/sa/b"), None);
        assert_eq!(p.identity, PeerIdentity::Plaintext);
    }
}
