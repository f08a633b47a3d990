//! Constants and wire formats of the proxy-wasm ABI v0.2.1, from the specification
//! (`proxy-wasm/spec`, `abi-versions/v0.2.1`). Pure: no wasmtime types here.

/// `proxy_status_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// `OK`
    Ok = 0,
    /// `NOT_FOUND`
    NotFound = 1,
    /// `BAD_ARGUMENT`
    BadArgument = 2,
    /// `SERIALIZATION_FAILURE`
    SerializationFailure = 3,
    /// `PARSE_FAILURE`
    ParseFailure = 4,
    /// `INVALID_MEMORY_ACCESS`
    InvalidMemoryAccess = 6,
    /// `EMPTY`
    Empty = 7,
    /// `CAS_MISMATCH`
    CasMismatch = 8,
    /// `INTERNAL_FAILURE`
    InternalFailure = 10,
    /// `UNIMPLEMENTED`
    Unimplemented = 12,
}

impl Status {
    /// The value the guest sees.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// `wasi_errno_t` values the host returns.
pub mod errno {
    /// `SUCCESS`
    pub const SUCCESS: i32 = 0;
    /// `BADF`
    pub const BADF: i32 = 8;
    /// `FAULT`
    pub const FAULT: i32 = 21;
    /// `INVAL`
    pub const INVAL: i32 = 28;
    /// `NOSYS`: WASI's "function not implemented".
    pub const NOSYS: i32 = 52;
    /// `NOTSUP`
    pub const NOTSUP: i32 = 58;
}

/// `proxy_action_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `CONTINUE`
    Continue,
    /// `PAUSE`
    Pause,
}

impl Action {
    /// Decodes a guest return value; anything but `PAUSE` continues, like Envoy.
    pub fn from_guest(value: i32) -> Self {
        if value == 1 {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

/// `proxy_log_level_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// `TRACE`
    Trace = 0,
    /// `DEBUG`
    Debug = 1,
    /// `INFO`
    Info = 2,
    /// `WARN`
    Warn = 3,
    /// `ERROR`
    Error = 4,
    /// `CRITICAL`
    Critical = 5,
}

impl LogLevel {
    /// Decodes a guest value; unknown levels are `None` (`BAD_ARGUMENT`).
    pub fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }

    /// Lower-case name, as Envoy prints it.
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
        }
    }
}

/// `proxy_buffer_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    /// `HTTP_REQUEST_BODY`
    HttpRequestBody,
    /// `HTTP_RESPONSE_BODY`
    HttpResponseBody,
    /// `DOWNSTREAM_DATA`
    DownstreamData,
    /// `UPSTREAM_DATA`
    UpstreamData,
    /// `HTTP_CALL_RESPONSE_BODY`
    HttpCallResponseBody,
    /// `GRPC_CALL_MESSAGE`
    GrpcCallMessage,
    /// `VM_CONFIGURATION`
    VmConfiguration,
    /// `PLUGIN_CONFIGURATION`
    PluginConfiguration,
    /// `FOREIGN_FUNCTION_ARGUMENTS`
    ForeignFunctionArguments,
}

impl BufferType {
    /// Decodes a guest value; unknown ids are `None` (`BAD_ARGUMENT`).
    pub fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => BufferType::HttpRequestBody,
            1 => BufferType::HttpResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcCallMessage,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::ForeignFunctionArguments,
            _ => return None,
        })
    }
}

/// `proxy_map_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    /// `HTTP_REQUEST_HEADERS`
    HttpRequestHeaders,
    /// `HTTP_REQUEST_TRAILERS`
    HttpRequestTrailers,
    /// `HTTP_RESPONSE_HEADERS`
    HttpResponseHeaders,
    /// `HTTP_RESPONSE_TRAILERS`
    HttpResponseTrailers,
    /// `GRPC_CALL_INITIAL_METADATA`
    GrpcCallInitialMetadata,
    /// `GRPC_CALL_TRAILING_METADATA`
    GrpcCallTrailingMetadata,
    /// `HTTP_CALL_RESPONSE_HEADERS`
    HttpCallResponseHeaders,
    /// `HTTP_CALL_RESPONSE_TRAILERS`
    HttpCallResponseTrailers,
}

impl MapType {
    /// Decodes a guest value; unknown ids are `None` (`BAD_ARGUMENT`).
    pub fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => MapType::HttpRequestHeaders,
            1 => MapType::HttpRequestTrailers,
            2 => MapType::HttpResponseHeaders,
            3 => MapType::HttpResponseTrailers,
            4 => MapType::GrpcCallInitialMetadata,
            5 => MapType::GrpcCallTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamType {
    /// `HTTP_REQUEST`
    HttpRequest,
    /// `HTTP_RESPONSE`
    HttpResponse,
    /// `DOWNSTREAM`
    Downstream,
    /// `UPSTREAM`
    Upstream,
}

impl StreamType {
    /// Decodes a guest value; unknown ids are `None` (`BAD_ARGUMENT`).
    pub fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => StreamType::HttpRequest,
            1 => StreamType::HttpResponse,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// `proxy_metric_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    /// `COUNTER`
    Counter,
    /// `GAUGE`
    Gauge,
    /// `HISTOGRAM`
    Histogram,
}

impl MetricType {
    /// Decodes a guest value; unknown types are `None` (`BAD_ARGUMENT`).
    pub fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// `proxy_peer_type_t` `REMOTE`: the peer closed the connection.
pub const PEER_REMOTE: i32 = 2;

/// A map of HTTP fields as the ABI carries it: ordered pairs of byte strings.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Serializes a map: count, then (key length, value length) pairs, then
/// NUL-terminated keys and values. An empty map is an empty buffer.
pub fn serialize_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    serialize_pairs_into(pairs, &mut out);
    out
}

/// [`serialize_pairs`], appended to `out`.
pub fn serialize_pairs_into(pairs: &[(Vec<u8>, Vec<u8>)], out: &mut Vec<u8>) {
    if pairs.is_empty() {
        return;
    }
    let data: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    out.reserve(4 + pairs.len() * 8 + data);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&len_u32(k.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(v.len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Why a serialized map from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    /// The buffer ends before what its header announces.
    #[error("serialized map truncated")]
    Truncated,
    /// A key or value is not followed by the NUL separator.
    #[error("serialized map entry not NUL-terminated")]
    MissingNul,
}

/// Parses a serialized map. Accepts the two spellings of an empty map
/// (zero bytes, or a single zero byte). Every length is checked.
pub fn deserialize_pairs(bytes: &[u8]) -> Result<Pairs, PairsError> {
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0).ok_or(PairsError::Truncated)? as usize;
    let header = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .ok_or(PairsError::Truncated)?;
    if header > bytes.len() {
        return Err(PairsError::Truncated);
    }
    let mut pairs = Vec::with_capacity(count);
    let mut pos = header;
    for i in 0..count {
        let klen = read_u32(bytes, 4 + i * 8).ok_or(PairsError::Truncated)? as usize;
        let vlen = read_u32(bytes, 8 + i * 8).ok_or(PairsError::Truncated)? as usize;
        let key = take_nul_terminated(bytes, &mut pos, klen)?;
        let value = take_nul_terminated(bytes, &mut pos, vlen)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn take_nul_terminated(bytes: &[u8], pos: &mut usize, len: usize) -> Result<Vec<u8>, PairsError> {
    let end = pos.checked_add(len).ok_or(PairsError::Truncated)?;
    let field = bytes.get(*pos..end).ok_or(PairsError::Truncated)?;
    match bytes.get(end) {
        Some(0) => {}
        Some(_) => return Err(PairsError::MissingNul),
        None => return Err(PairsError::Truncated),
    }
    *pos = end + 1;
    Ok(field.to_vec())
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// Splits a property path as the guest sends it (segments separated by NUL).
pub fn split_path(path: &[u8]) -> Vec<String> {
    path.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[test]
    fn map_serialization_matches_the_spec_example() {
        let bytes = serialize_pairs(&[p("a", "1"), p("b", "22")]);
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0];
        want.extend_from_slice(b"a\x001\x00b\x0022\x00");
        assert_eq!(bytes, want);
        assert_eq!(
            deserialize_pairs(&bytes).unwrap(),
            vec![p("a", "1"), p("b", "22")]
        );
    }

    #[test]
    fn both_spellings_of_an_empty_map_parse() {
        assert!(deserialize_pairs(&[]).unwrap().is_empty());
        assert!(deserialize_pairs(&[0]).unwrap().is_empty());
    }

    #[test]
    fn map_whose_header_claims_more_than_the_buffer_is_refused() {
        let mut bytes = serialize_pairs(&[p("key", "value")]);
        bytes.truncate(bytes.len() - 3);
        assert_eq!(deserialize_pairs(&bytes), Err(PairsError::Truncated));
        let huge = [0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0];
        assert_eq!(deserialize_pairs(&huge), Err(PairsError::Truncated));
    }

    #[test]
    fn map_entry_without_nul_is_refused() {
        let mut bytes = serialize_pairs(&[p("k", "v")]);
        let n = bytes.len();
        bytes[n - 1] = b'x';
        assert_eq!(deserialize_pairs(&bytes), Err(PairsError::MissingNul));
    }

    #[test]
    fn property_path_splits_on_nul() {
        assert_eq!(
            split_path(b"connection\0uri_san_peer_certificate"),
            vec!["connection", "uri_san_peer_certificate"]
        );
    }
}
