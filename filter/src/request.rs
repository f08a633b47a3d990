//! What the peer asks for: the `to` side of a rule.

/// HTTP request or plain TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// A network-filter decision: only the destination port is known.
    Tcp,
}

/// The request attributes rules match. Borrowed from the host's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub protocol: Protocol,
    /// `:authority` (a `:port` suffix is ignored when matching).
    pub host: Option<&'a str>,
    /// `:method`.
    pub method: Option<&'a str>,
    /// `:path` (the query and fragment are ignored when matching).
    pub path: Option<&'a str>,
    /// `destination.port`.
    pub port: Option<u16>,
}

impl<'a> Request<'a> {
    /// An HTTP request.
    pub fn http(
        host: Option<&'a str>,
        method: Option<&'a str>,
        path: Option<&'a str>,
        port: Option<u16>,
    ) -> Self {
        Self {
            protocol: Protocol::Http,
            host,
            method,
            path,
            port,
        }
    }

    /// A TCP connection to `port`.
    pub fn tcp(port: Option<u16>) -> Self {
        Self {
            protocol: Protocol::Tcp,
            host: None,
            method: None,
            path: None,
            port,
        }
    }
}

/// `:authority` without a trailing `:port` (keeps `[v6]`).
pub fn host_without_port(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(at)
            if authority
                .get(at + 1..)
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                && !authority
                    .get(..at)
                    .is_some_and(|h| h.contains(':') && !h.ends_with(']')) =>
        {
            authority.get(..at).unwrap_or(authority)
        }
        _ => authority,
    }
}

/// `:path` without `?query` / `#fragment`.
pub fn path_without_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    path.get(..end).unwrap_or(path)
}

/// True when a path could mean something else after normalization: dot
/// segments, backslashes, or percent-encoded `/`, `\` or `.`. Envoy normalizes
/// these when configured to; when it was not, the filter refuses rather than
/// guess (a DENY on `/admin*` must not be bypassed by `/x/../admin`).
pub fn path_is_ambiguous(path: &str) -> bool {
    let bytes = path.as_bytes();
    let dot_segment = |segment: &[u8]| segment == b"." || segment == b"..";
    let mut segment_start = 0;
    for (at, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return true,
            b'%' => {
                let hex = (
                    bytes.get(at + 1),
                    bytes.get(at + 2).map(u8::to_ascii_lowercase),
                );
                if matches!(
                    hex,
                    (Some(b'2'), Some(b'f' | b'e')) | (Some(b'5'), Some(b'c'))
                ) {
                    return true;
                }
            }
            b'/' => {
                if dot_segment(bytes.get(segment_start..at).unwrap_or_default()) {
                    return true;
                }
                segment_start = at + 1;
            }
            _ => {}
        }
    }
    dot_segment(bytes.get(segment_start..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_port_is_stripped() {
        assert_eq!(host_without_port("Web.Example:8080"), "Web.Example");
        assert_eq!(host_without_port("web"), "web");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("::1"), "::1");
        assert_eq!(host_without_port("web:"), "web:");
    }

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(path_without_query("/a/b?x=/admin"), "/a/b");
        assert_eq!(path_without_query("/a#b"), "/a");
        assert_eq!(path_without_query("/a"), "/a");
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_ambiguous() {
        for p in [
            "/x/../admin",
            "/./admin",
            "/admin/..",
            "/a%2Fb",
            "/a%5cb",
            "/%2e%2e/admin",
            "/a\\b",
        ] {
            assert!(path_is_ambiguous(p), "{p}");
        }
        for p in ["/admin", "/a.b/c..d", "/", "/v1.0/x"] {
            assert!(!path_is_ambiguous(p), "{p}");
        }
    }

    /// The first definition, kept as the reference the single-pass one must
    /// agree with: a path it calls ambiguous must stay ambiguous, or a DENY
    /// on `/admin*` could be bypassed.
    fn path_is_ambiguous_reference(path: &str) -> bool {
        let lower = path.to_ascii_lowercase();
        if lower.contains('\\')
            || lower.contains("%2f")
            || lower.contains("%5c")
            || lower.contains("%2e")
        {
            return true;
        }
        lower
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    }

    #[test]
    fn encoded_dot_segment_bypass_is_caught_like_the_reference() {
        let alphabet = [
            "/", ".", "%", "2", "5", "e", "E", "f", "F", "c", "C", "\\", "a", "?",
        ];
        // Every string of up to 4 symbols from the alphabet.
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &paths {
                for a in alphabet {
                    next.push(format!("{p}{a}"));
                }
            }
            paths.extend(next);
            paths.dedup();
        }
        for p in &paths {
            assert_eq!(
                path_is_ambiguous(p),
                path_is_ambiguous_reference(p),
                "{p:?}"
            );
        }
        for p in ["/x/%2E%2e/admin", "/admin%2F", "/a/%5C/b", "/é/../x", "/%"] {
            assert_eq!(
                path_is_ambiguous(p),
                path_is_ambiguous_reference(p),
                "{p:?}"
            );
        }
    }
}
