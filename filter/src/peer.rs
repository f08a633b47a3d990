//! Who is on the other end of the connection, as the proxy verified it.
//!
//! Built only from connection facts (`connection.mtls`,
//! `connection.uri_san_peer_certificate`, the peer certificate), never from
//! request headers.

use crate::cert::PeerCert;
use std::sync::Arc;

/// Longest SPIFFE ID the spec allows, in bytes.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

/// Longest trust domain name the spec allows, in bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

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

/// A validated SPIFFE ID, kept as the string the policy matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeIdentity {
    /// Istio's principal form: `<trust-domain><path>` (no `spiffe://`), the
    /// trust domain in lower case.
    principal: String,
    /// Length of the trust domain at the start of `principal`.
    trust_domain_len: usize,
    /// Byte range of the namespace inside `principal`, if the path has `/ns/<ns>`.
    namespace: Option<(usize, usize)>,
}

/// Bytes the SPIFFE ID spec allows in a trust domain (after lower-casing).
const fn trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_')
}

/// Bytes the SPIFFE ID spec allows in a path segment.
const fn path_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_')
}

impl SpiffeIdentity {
    /// Parses and validates a SPIFFE ID by the spec's rules — the same
    /// acceptance as the `spiffe` crate's `SpiffeId::new` (a test compares
    /// them): scheme `spiffe` in any case, a trust domain of
    /// `[a-z0-9._-]` (upper-case letters taken as lower case, at most 255
    /// bytes), a path of non-empty segments of `[a-zA-Z0-9._-]` that are not
    /// `.` or `..` — so no port, user info, query, fragment, percent-encoding
    /// or trailing slash. On top of the spec: at most 2048 bytes and a
    /// non-empty path (a trust domain alone is not a workload). One
    /// allocation: the principal string.
    pub fn parse(uri: &str) -> Result<Self, String> {
        if uri.len() > MAX_SPIFFE_ID_BYTES {
            return Err(format!("longer than {MAX_SPIFFE_ID_BYTES} bytes"));
        }
        if uri.is_empty() {
            return Err("empty".into());
        }
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err("scheme is not spiffe".into());
        };
        if !scheme.eq_ignore_ascii_case("spiffe") {
            return Err("scheme is not spiffe".into());
        }
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if td.is_empty() {
            return Err("trust domain is missing".into());
        }
        if td.len() > MAX_TRUST_DOMAIN_BYTES {
            return Err(format!(
                "trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
            ));
        }
        if !td
            .bytes()
            .all(|b| trust_domain_byte(b.to_ascii_lowercase()))
        {
            return Err(
                "trust domain characters are limited to letters, numbers, dots, dashes, and underscores"
                    .into(),
            );
        }
        if path.is_empty() {
            return Err("has no path (a trust domain is not a workload identity)".into());
        }
        // `path` starts with '/': every segment after it is checked.
        let mut segments = path.split('/').skip(1).peekable();
        while let Some(segment) = segments.next() {
            if segment.is_empty() {
                return Err(if segments.peek().is_some() {
                    "path cannot contain empty segments".into()
                } else {
                    "path cannot have a trailing slash".into()
                });
            }
            if segment == "." || segment == ".." {
                return Err("path cannot contain dot segments".into());
            }
            if !segment.bytes().all(path_byte) {
                return Err(
                    "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
                        .into(),
                );
            }
        }
        let mut principal = String::with_capacity(td.len() + path.len());
        principal.extend(td.chars().map(|c| c.to_ascii_lowercase()));
        principal.push_str(path);
        let trust_domain_len = td.len();
        let namespace = path.find("/ns/").and_then(|at| {
            let start = trust_domain_len + at + 4;
            let rest = principal.get(start..)?;
            let len = rest.find('/').unwrap_or(rest.len());
            (len > 0).then_some((start, start + len))
        });
        Ok(Self {
            principal,
            trust_domain_len,
            namespace,
        })
    }

    /// `<trust-domain>/<path>`, the string `principals` patterns match.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The trust domain (lower case).
    pub fn trust_domain(&self) -> &str {
        self.principal
            .get(..self.trust_domain_len)
            .unwrap_or_default()
    }

    /// The segment after the first `/ns/` of the path, as Istio derives
    /// `source.namespace` from a principal.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace
            .and_then(|(start, end)| self.principal.get(start..end))
    }
}

/// Most URI SANs an [`IdentityCache`] keeps before starting over.
pub const IDENTITY_CACHE_ENTRIES: usize = 1024;

/// Parsed peer identities by URI SAN, for one thread (a proxy-wasm VM is
/// single-threaded). Bounded: emptied when [`IDENTITY_CACHE_ENTRIES`] are
/// held. Parsing is a pure function of the string, so an entry never goes
/// stale.
#[derive(Debug, Default)]
pub struct IdentityCache {
    entries: std::cell::RefCell<
        std::collections::HashMap<Box<str>, Arc<PeerIdentity>, crate::pattern::FixedState>,
    >,
}

impl IdentityCache {
    /// The identity a verified URI SAN `uri` (non-empty) stands for.
    pub fn identity(&self, uri: &str) -> Arc<PeerIdentity> {
        if let Some(found) = self.entries.borrow().get(uri) {
            return Arc::clone(found);
        }
        let parsed = Peer::from_connection(true, Some(uri), None).identity;
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= IDENTITY_CACHE_ENTRIES {
            entries.clear();
        }
        entries.insert(uri.into(), Arc::clone(&parsed));
        parsed
    }

    /// URI SANs held.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything the policy knows about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub mtls: bool,
    /// Shared: the identity is a connection's, parsed once however many
    /// requests the connection carries.
    pub identity: Arc<PeerIdentity>,
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
            identity: Arc::new(identity),
            cert: if mtls { cert } else { None },
        }
    }

    /// [`Peer::from_connection`], the identity taken from `cache` when this
    /// URI SAN was parsed before (a sidecar sees few peer identities, each
    /// on many connections).
    pub fn from_connection_cached(
        mtls: bool,
        uri_san: Option<&str>,
        cert: Option<PeerCert>,
        cache: &IdentityCache,
    ) -> Self {
        match (mtls, uri_san) {
            (true, Some(uri)) if !uri.is_empty() => Self {
                mtls,
                identity: cache.identity(uri),
                cert,
            },
            _ => Self::from_connection(mtls, uri_san, cert),
        }
    }

    /// The same peer with the validity of its certificate as known for one
    /// request (ignored without mTLS, as in [`Peer::from_connection`]).
    pub fn with_cert(&self, cert: Option<PeerCert>) -> Self {
        Self {
            mtls: self.mtls,
            identity: Arc::clone(&self.identity),
            cert: if self.mtls { cert } else { None },
        }
    }

    /// The SPIFFE identity, if the peer has a valid one.
    pub fn spiffe(&self) -> Option<&SpiffeIdentity> {
        match &*self.identity {
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
            assert!(matches!(*p.identity, PeerIdentity::Invalid { .. }), "{bad}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2040));
        assert!(matches!(
            *Peer::from_connection(true, Some(&long), None).identity,
            PeerIdentity::Invalid { .. }
        ));
    }

    #[test]
    fn cached_identity_is_the_parsed_one_and_never_used_without_mtls() {
        let cache = IdentityCache::default();
        for uri in [
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "https://cluster.local/ns/a/sa/b",
        ] {
            for _ in 0..2 {
                let cached = Peer::from_connection_cached(true, Some(uri), None, &cache);
                assert_eq!(
                    cached,
                    Peer::from_connection(true, Some(uri), None),
                    "{uri}"
                );
            }
            let plaintext = Peer::from_connection_cached(false, Some(uri), None, &cache);
            assert_eq!(*plaintext.identity, PeerIdentity::Plaintext);
        }
        assert_eq!(cache.len(), 3);
        let no_san = Peer::from_connection_cached(true, Some(""), None, &cache);
        assert_eq!(*no_san.identity, PeerIdentity::NoUriSan);
    }

    #[test]
    fn uri_san_without_mtls_is_not_an_identity() {
        let p = Peer::from_connection(false, Some("spiffe://cluster.local/ns/a/sa/b"), None);
        assert_eq!(*p.identity, PeerIdentity::Plaintext);
    }

    /// The parser must accept exactly what the `spiffe` crate accepts (plus
    /// our own limits), or a peer could be read as an identity the rest of
    /// the mesh does not agree it has.
    #[test]
    fn spiffe_parse_agrees_with_the_spiffe_crate() {
        let mut cases: Vec<String> = [
            "spiffe://cluster.local/ns/a/sa/b",
            "SPIFFE://Cluster.Local/ns/A/sa/B",
            "Spiffe://td/x",
            "spiffe://td_1-2.x/a.b/c-d/e_f",
            "spiffe://td/.a/..b/c.",
            "spiffe://td/./a",
            "spiffe://td/../a",
            "spiffe://td/a/.",
            "spiffe://td/a/",
            "spiffe://td//a",
            "spiffe://td/a//b",
            "spiffe://td",
            "spiffe://td/",
            "spiffe:///a",
            "spiffe://",
            "spiffe:/td/a",
            "spiffe:td/a",
            "spiffex://td/a",
            "http://td/a",
            "://td/a",
            "",
            "spiffe://t d/a",
            "spiffe://td/a b",
            "spiffe://td:8080/a",
            "spiffe://user@td/a",
            "spiffe://td/a?q",
            "spiffe://td/a#f",
            "spiffe://td/%41",
            "spiffe://tdé/a",
            "spiffe://td/é",
            "spiffe://td/a://b",
            "spiffe://td/ns/",
            "spiffe://td/ns//x",
            "spiffe://td/ns/x",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        cases.push(format!("spiffe://{}/a", "t".repeat(255)));
        cases.push(format!("spiffe://{}/a", "t".repeat(256)));
        cases.push(format!("spiffe://td/{}", "a".repeat(2036)));
        // Every single byte in a trust domain and in a path segment.
        for b in 0u8..=127 {
            let c = char::from(b);
            cases.push(format!("spiffe://t{c}d/a"));
            cases.push(format!("spiffe://td/a{c}b"));
        }
        for case in &cases {
            let ours = SpiffeIdentity::parse(case);
            let theirs = spiffe::SpiffeId::new(case.as_str());
            match (&ours, &theirs) {
                (Ok(id), Ok(reference)) => {
                    assert_eq!(
                        id.principal(),
                        format!("{}{}", reference.trust_domain_name(), reference.path()),
                        "{case:?}"
                    );
                    assert_eq!(id.trust_domain(), reference.trust_domain_name(), "{case:?}");
                }
                (Err(_), Err(_)) => {}
                // Our own additions: a path is required, 2048 bytes at most.
                (Err(_), Ok(reference))
                    if reference.path().is_empty() || case.len() > MAX_SPIFFE_ID_BYTES => {}
                _ => panic!("{case:?}: ours {ours:?}, spiffe crate {theirs:?}"),
            }
        }
    }
}
