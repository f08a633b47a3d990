//! Reading the host: properties (with their encodings), headers, time, logs.
//! SDK calls that return `Err` become `HostError`, which the callers turn
//! into a deny.

use crate::UnixTime;
use crate::cert::{self, CertSource, PeerCert};
use crate::pattern::FixedState;
use crate::xfcc;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// A host call failed or returned something outside the contract.
#[derive(Debug)]
pub struct HostError(pub String);

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Whether the proxy writes `level` now — asked on each use, as Envoy's
/// level can change at run time — so a message nobody reads is never built.
/// If the host cannot say, log.
pub fn log_enabled(level: LogLevel) -> bool {
    hostcalls::get_log_level().map_or(true, |current| level as u32 >= current as u32)
}

fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    hostcalls::get_property(path.to_vec())
        .map_err(|s| HostError(format!("get_property {}: {s:?}", path.join("."))))
}

/// A string property (raw bytes, UTF-8).
pub fn property_string(path: &[&str]) -> Result<Option<String>, HostError> {
    match property(path)? {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| HostError(format!("property {} is not UTF-8", path.join(".")))),
    }
}

/// A bool property (1 byte, 0 or 1).
pub fn property_bool(path: &[&str]) -> Result<Option<bool>, HostError> {
    match property(path)?.as_deref() {
        None => Ok(None),
        Some([0]) => Ok(Some(false)),
        Some([1]) => Ok(Some(true)),
        Some(other) => Err(HostError(format!(
            "property {} is not a 1-byte bool ({} bytes)",
            path.join("."),
            other.len()
        ))),
    }
}

/// An integer property (8 bytes, little-endian).
pub fn property_u64(path: &[&str]) -> Result<Option<u64>, HostError> {
    match property(path)? {
        None => Ok(None),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(|b| Some(u64::from_le_bytes(b)))
            .map_err(|_| {
                HostError(format!(
                    "property {} is not an 8-byte integer",
                    path.join(".")
                ))
            }),
    }
}

/// `proxy_get_current_time_nanoseconds`, in Unix seconds.
pub fn now() -> Result<UnixTime, HostError> {
    let t =
        hostcalls::get_current_time().map_err(|s| HostError(format!("get_current_time: {s:?}")))?;
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| HostError("host clock is before 1970".into()))?
        .as_secs();
    i64::try_from(secs)
        .map(UnixTime)
        .map_err(|_| HostError("host clock out of range".into()))
}

/// One request header (first value). Read as bytes: the SDK's string variant
/// panics on a non-UTF-8 value, which a client controls; here it is an error
/// (and the request is denied).
pub fn request_header(name: &str) -> Result<Option<String>, HostError> {
    match hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .map_err(|s| HostError(format!("get header {name}: {s:?}")))?
    {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| HostError(format!("request header {name} is not UTF-8"))),
    }
}

/// What the proxy verified about the downstream connection.
pub struct Connection {
    pub mtls: bool,
    pub uri_san: Option<String>,
    pub digest: Option<String>,
    /// The validity decoded from `connection.peer_certificate`, when the
    /// proxy gives it (decoded once, when the connection is read).
    pub property_cert: Option<PeerCert>,
    pub port: Option<u16>,
}

impl Connection {
    pub fn read() -> Result<Self, HostError> {
        let mtls = property_bool(&["connection", "mtls"])?.unwrap_or(false);
        Self::read_mtls_known(mtls)
    }

    /// [`Connection::read`] when `connection.mtls` was just read.
    pub fn read_mtls_known(mtls: bool) -> Result<Self, HostError> {
        let port = match property_u64(&["destination", "port"])? {
            None => None,
            Some(p) => Some(
                u16::try_from(p)
                    .map_err(|_| HostError(format!("destination.port {p} out of range")))?,
            ),
        };
        let property_cert = property_string(&["connection", "peer_certificate"])?
            .filter(|s| !s.is_empty())
            .and_then(|encoded| {
                match cert::der_from_url_encoded_pem(&encoded)
                    .and_then(|der| cert::validity_from_der(&der))
                {
                    Ok(validity) => Some(PeerCert {
                        validity,
                        source: CertSource::PeerCertificateProperty,
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
        Ok(Self {
            mtls,
            uri_san: property_string(&["connection", "uri_san_peer_certificate"])?
                .filter(|s| !s.is_empty()),
            digest: property_string(&["connection", "sha256_peer_certificate_digest"])?
                .filter(|s| !s.is_empty()),
            property_cert,
            port,
        })
    }

    /// The peer certificate's validity, from the first source that has it:
    /// `connection.peer_certificate`, then the XFCC element whose `Cert=`
    /// digest equals `connection.sha256_peer_certificate_digest`.
    /// (The signer's ledger, looked up by that digest, is the next source.)
    pub fn peer_cert(&self, xfcc_header: Option<&str>) -> Option<PeerCert> {
        if let Some(found) = self.property_cert {
            return Some(found);
        }
        let (Some(header), Some(digest)) = (xfcc_header, &self.digest) else {
            return None;
        };
        match xfcc::peer_cert_from_xfcc(header, digest) {
            Ok(found) => found,
            Err(e) => {
                if log_enabled(LogLevel::Debug) {
                    log(
                        LogLevel::Debug,
                        &format!("meshward: no validity from XFCC: {e}"),
                    );
                }
                None
            }
        }
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
        let id = property_u64(&["connection", "id"])?;
        if let Some(id) = id
            && let Some(found) = self.entries.borrow().get(&id)
        {
            return Ok(Rc::clone(found));
        }
        let conn = Rc::new(Connection::read()?);
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
