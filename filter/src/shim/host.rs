//! Reading the host: properties (with their encodings), headers, time, logs.
//! SDK calls that return `Err` become `HostError`, which the callers turn
//! into a deny.

use super::abi;
use crate::UnixTime;
use crate::cert::{self, CertSource, PeerCert};
use crate::header_pairs;
use crate::pattern::FixedState;
use crate::peer::{IdentityCache, Peer};
use crate::policy::{PeerRules, PeerRulesCache, Policy};
use crate::xfcc;
use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

/// A host call failed or returned something outside the contract.
#[derive(Debug)]
pub struct HostError(pub String);

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

thread_local! {
    /// Peer identities by URI SAN, parsed once per VM.
    static IDENTITIES: IdentityCache = IdentityCache::default();
    /// The proxy's log level and the host second ([`now`]) it was read in.
    static LOG_LEVEL: Cell<Option<(i64, u32)>> = const { Cell::new(None) };
    /// The last second [`now`] returned.
    static LAST_SECOND: Cell<i64> = const { Cell::new(i64::MIN) };
}

/// Whether the proxy writes `level` now, so a message nobody reads is never
/// built. Envoy's level can change at run time: it is asked again once per
/// second of host time (every decision reads the clock), not on every
/// request. If the host cannot say, log.
pub fn log_enabled(level: LogLevel) -> bool {
    let second = LAST_SECOND.with(Cell::get);
    let current = match LOG_LEVEL.with(Cell::get) {
        Some((at, current)) if at == second => current,
        _ => match hostcalls::get_log_level() {
            Ok(current) => {
                let current = current as u32;
                LOG_LEVEL.with(|l| l.set(Some((second, current))));
                current
            }
            Err(_) => return true,
        },
    };
    level as u32 >= current
}

/// A property path: raw (segments joined by NUL, as the ABI takes it) and
/// dotted (for messages). Made by [`prop!`] at compile time.
#[derive(Clone, Copy)]
pub struct Prop {
    raw: &'static [u8],
    name: &'static str,
}

/// `prop!("connection", "mtls")`: the property `connection.mtls`.
macro_rules! prop {
    ($first:literal $(, $rest:literal)*) => {
        $crate::shim::host::Prop::new(
            concat!($first $(, "\0", $rest)*).as_bytes(),
            concat!($first $(, ".", $rest)*),
        )
    };
}
pub(crate) use prop;

impl Prop {
    pub const fn new(raw: &'static [u8], name: &'static str) -> Self {
        Self { raw, name }
    }
}

fn property(path: Prop) -> Result<Option<Vec<u8>>, HostError> {
    abi::get_property(path.raw)
        .map_err(|status| HostError(format!("get_property {}: status {status}", path.name)))
}

/// Whether the host has the property, even with an empty value.
pub fn property_present(path: Prop) -> Result<bool, HostError> {
    abi::has_property(path.raw)
        .map_err(|status| HostError(format!("get_property {}: status {status}", path.name)))
}

/// A string property (raw bytes, UTF-8).
pub fn property_string(path: Prop) -> Result<Option<String>, HostError> {
    match property(path)? {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| HostError(format!("property {} is not UTF-8", path.name))),
    }
}

/// A bool property (1 byte, 0 or 1).
pub fn property_bool(path: Prop) -> Result<Option<bool>, HostError> {
    match property(path)?.as_deref() {
        None => Ok(None),
        Some([0]) => Ok(Some(false)),
        Some([1]) => Ok(Some(true)),
        Some(other) => Err(HostError(format!(
            "property {} is not a 1-byte bool ({} bytes)",
            path.name,
            other.len()
        ))),
    }
}

/// An integer property (8 bytes, little-endian).
pub fn property_u64(path: Prop) -> Result<Option<u64>, HostError> {
    match property(path)? {
        None => Ok(None),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(|b| Some(u64::from_le_bytes(b)))
            .map_err(|_| HostError(format!("property {} is not an 8-byte integer", path.name))),
    }
}

/// `proxy_get_current_time_nanoseconds`, in Unix seconds.
pub fn now() -> Result<UnixTime, HostError> {
    let nanos = abi::current_time_nanos()
        .map_err(|status| HostError(format!("get_current_time: status {status}")))?;
    let secs = i64::try_from(nanos / 1_000_000_000)
        .map_err(|_| HostError("host clock out of range".into()))?;
    LAST_SECOND.with(|s| s.set(secs));
    Ok(UnixTime(secs))
}

/// `proxy_get_current_time_nanoseconds`, in Unix milliseconds.
pub fn now_millis() -> Result<u64, HostError> {
    abi::current_time_nanos()
        .map(|nanos| nanos / 1_000_000)
        .map_err(|status| HostError(format!("get_current_time: status {status}")))
}

/// The request headers a decision reads, found in one
/// `proxy_get_header_map_pairs` answer kept as the host gave it: one host
/// call per request instead of one per header, no copy per header. The
/// first value of a name counts (what `proxy_get_header_map_value` answers);
/// names compare without regard to case.
pub struct RequestHeaders {
    buf: Vec<u8>,
    authority: Option<Range<usize>>,
    method: Option<Range<usize>>,
    path: Option<Range<usize>>,
    xfcc: Option<Range<usize>>,
    /// Whether the client sent [`DENY_REASON_HEADER`](super::http::DENY_REASON_HEADER).
    pub has_deny_reason: bool,
}

impl RequestHeaders {
    /// Reads the map. `:authority`, `:method` and `:path` must be UTF-8 (a
    /// client controls them; anything else is an error, and a deny).
    pub fn read() -> Result<Self, HostError> {
        let buf = abi::get_header_map_pairs(abi::HTTP_REQUEST_HEADERS)
            .map_err(|status| HostError(format!("get request headers: status {status}")))?;
        let mut found = Self {
            buf: Vec::new(),
            authority: None,
            method: None,
            path: None,
            xfcc: None,
            has_deny_reason: false,
        };
        header_pairs::for_each_pair(&buf, |name, value| {
            let name = buf.get(name).unwrap_or_default();
            let slot = match name {
                n if n.eq_ignore_ascii_case(b":authority") => &mut found.authority,
                n if n.eq_ignore_ascii_case(b":method") => &mut found.method,
                n if n.eq_ignore_ascii_case(b":path") => &mut found.path,
                n if n.eq_ignore_ascii_case(b"x-forwarded-client-cert") => &mut found.xfcc,
                n if n.eq_ignore_ascii_case(super::http::DENY_REASON_HEADER.as_bytes()) => {
                    found.has_deny_reason = true;
                    return;
                }
                _ => return,
            };
            slot.get_or_insert(value);
        })
        .map_err(|e| HostError(e.to_string()))?;
        found.buf = buf;
        for (name, range) in [
            (":authority", &found.authority),
            (":method", &found.method),
            (":path", &found.path),
        ] {
            if let Some(r) = range
                && std::str::from_utf8(found.buf.get(r.clone()).unwrap_or_default()).is_err()
            {
                return Err(HostError(format!("request header {name} is not UTF-8")));
            }
        }
        Ok(found)
    }

    fn text(&self, range: &Option<Range<usize>>) -> Option<&str> {
        range
            .as_ref()
            .and_then(|r| self.buf.get(r.clone()))
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn authority(&self) -> Option<&str> {
        self.text(&self.authority)
    }

    pub fn method(&self) -> Option<&str> {
        self.text(&self.method)
    }

    pub fn path(&self) -> Option<&str> {
        self.text(&self.path)
    }

    /// `x-forwarded-client-cert`, checked for UTF-8 only when asked for.
    pub fn xfcc(&self) -> Result<Option<String>, HostError> {
        match &self.xfcc {
            None => Ok(None),
            Some(r) => std::str::from_utf8(self.buf.get(r.clone()).unwrap_or_default())
                .map(|s| Some(s.to_string()))
                .map_err(|_| {
                    HostError("request header x-forwarded-client-cert is not UTF-8".into())
                }),
        }
    }
}

/// What the proxy verified about the downstream connection.
pub struct Connection {
    pub mtls: bool,
    pub uri_san: Option<String>,
    /// Read only when asked for (XFCC matching, ledger lookups).
    pub digest: Option<String>,
    /// The validity decoded from `connection.peer_certificate`, when the
    /// proxy gives it (decoded once, when the connection is read).
    pub property_cert: Option<PeerCert>,
    pub port: Option<u16>,
    /// The peer as the policy sees it: its URI SAN parsed once per
    /// connection, with the validity from `connection.peer_certificate`.
    pub peer: Peer,
    /// The peer's rules under the policy that last decided on this
    /// connection (an HTTP connection's requests skip even the per-identity
    /// cache lookup).
    rules: RefCell<Option<Rc<PeerRules>>>,
    /// The validity found in XFCC for this connection's certificate, kept so
    /// that its later requests do not decode the `Cert=` PEM and hash it
    /// again (in Envoy, which has no `connection.peer_certificate`, that
    /// decoding and SHA-256 in wasm were most of a request's cost). Sound
    /// because the element is picked by the connection's own digest, so
    /// every request of the connection finds the same certificate.
    xfcc_cert: Cell<Option<PeerCert>>,
}

impl Connection {
    /// Reads the connection's facts; `connection.sha256_peer_certificate_digest`
    /// only `with_digest` (one host call less per connection when nothing
    /// would use it).
    pub fn read(with_digest: bool) -> Result<Self, HostError> {
        let mtls = property_bool(prop!("connection", "mtls"))?.unwrap_or(false);
        Self::read_mtls_known(mtls, with_digest)
    }

    /// [`Connection::read`] when `connection.mtls` was just read.
    pub fn read_mtls_known(mtls: bool, with_digest: bool) -> Result<Self, HostError> {
        let port = match property_u64(prop!("destination", "port"))? {
            None => None,
            Some(p) => Some(
                u16::try_from(p)
                    .map_err(|_| HostError(format!("destination.port {p} out of range")))?,
            ),
        };
        let property_cert = property_string(prop!("connection", "peer_certificate"))?
            .filter(|s| !s.is_empty())
            .and_then(|encoded| {
                match cert::der_from_url_encoded_pem(&encoded)
                    .and_then(|der| cert::validity_from_der(&der))
                {
                    Ok(validity) => Some(PeerCert {
                        validity,
                        source: CertSource::PeerCertificateProperty,
                        revoked: None,
                    }),
                    Err(e) => {
                        log(
                            LogLevel::Warn,
                            &format!("meshward: connection.peer_certificate unreadable: {e}"),
                        );
                        None
                    }
                }
            });
        let uri_san = property_string(prop!("connection", "uri_san_peer_certificate"))?
            .filter(|s| !s.is_empty());
        let digest = if with_digest {
            property_string(prop!("connection", "sha256_peer_certificate_digest"))?
                .filter(|s| !s.is_empty())
        } else {
            None
        };
        let peer = IDENTITIES.with(|cache| {
            Peer::from_connection_cached(mtls, uri_san.as_deref(), property_cert, cache)
        });
        Ok(Self {
            mtls,
            uri_san,
            digest,
            property_cert,
            port,
            peer,
            rules: RefCell::new(None),
            xfcc_cert: Cell::new(None),
        })
    }

    /// `policy`'s rules for this connection's peer, from the connection,
    /// else from `cache` (then kept on the connection).
    pub fn rules(&self, policy: &Policy, cache: &PeerRulesCache) -> Option<Rc<PeerRules>> {
        if let Some(rules) = self.rules.borrow().as_ref().filter(|r| r.is_for(policy)) {
            return Some(Rc::clone(rules));
        }
        let rules = cache.rules(policy, &self.peer.identity);
        self.rules.borrow_mut().clone_from(&rules);
        rules
    }

    /// The peer certificate's validity, from the first source that has it:
    /// `connection.peer_certificate`, then the XFCC element whose `Cert=`
    /// digest equals `connection.sha256_peer_certificate_digest`.
    /// (The signer's ledger, looked up by that digest, is the next source.)
    /// `xfcc_header` is called only when the XFCC header could be used and
    /// no earlier request of the connection found the certificate in it.
    pub fn peer_cert(
        &self,
        xfcc_header: impl FnOnce() -> Result<Option<String>, HostError>,
    ) -> Result<Option<PeerCert>, HostError> {
        if let Some(found) = self.property_cert {
            return Ok(Some(found));
        }
        if let Some(found) = self.xfcc_cert.get() {
            return Ok(Some(found));
        }
        let Some(digest) = &self.digest else {
            return Ok(None);
        };
        let Some(header) = xfcc_header()? else {
            return Ok(None);
        };
        Ok(match xfcc::peer_cert_from_xfcc(&header, digest) {
            Ok(found) => {
                // Only a find is kept: a request without the element (or
                // with it unreadable) leaves the next one to look again.
                if found.is_some() {
                    self.xfcc_cert.set(found);
                }
                found
            }
            Err(e) => {
                if log_enabled(LogLevel::Debug) {
                    log(
                        LogLevel::Debug,
                        &format!("meshward: no validity from XFCC: {e}"),
                    );
                }
                None
            }
        })
    }
}

/// Most connections whose facts are kept (then the cache starts over).
pub const CONNECTION_CACHE_ENTRIES: usize = 4096;

/// Connection facts by Envoy's `connection.id`, so the requests on one
/// downstream connection — every request of a pooled HTTP/2 connection
/// between sidecars — read them from the host and decode the peer
/// certificate once, not per request. Sound because what they say (mTLS,
/// the peer's URI SAN, digest and certificate, the port) is fixed when the
/// handshake ends, and Envoy never reuses a connection ID within a process.
/// Without a `connection.id` nothing is cached. Bounded: when
/// [`CONNECTION_CACHE_ENTRIES`] are held the cache is emptied (closed
/// connections are never announced to an HTTP filter), which costs only
/// reading again.
#[derive(Default)]
pub struct ConnectionCache {
    entries: RefCell<HashMap<u64, Rc<Connection>, FixedState>>,
}

impl ConnectionCache {
    /// The current stream's connection facts.
    pub fn current(&self) -> Result<Rc<Connection>, HostError> {
        let id = property_u64(prop!("connection", "id"))?;
        if let Some(id) = id
            && let Some(found) = self.entries.borrow().get(&id)
        {
            return Ok(Rc::clone(found));
        }
        let conn = Rc::new(Connection::read(true)?);
        if let Some(id) = id {
            let mut entries = self.entries.borrow_mut();
            if entries.len() >= CONNECTION_CACHE_ENTRIES {
                entries.clear();
            }
            entries.insert(id, Rc::clone(&conn));
        }
        Ok(conn)
    }
}
