//! What the host keeps per plugin instance (the wasmtime store's data) and
//! what several instances of one proxy share.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use wasmtime::{Memory, TypedFunc};

use super::abi::{LogLevel, Pairs, Status};
use super::metrics::Metrics;
use super::properties::Properties;

/// Where the host reads the time. Callbacks see the time frozen at the
/// moment the host entered them, like Envoy.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that runs `offset` ahead of (or behind, with `ahead = false`) the
/// system clock: lets a test put a proxy in the future without sleeping.
#[derive(Debug, Clone, Copy)]
pub struct OffsetClock {
    /// How far.
    pub offset: std::time::Duration,
    /// Ahead (true) or behind.
    pub ahead: bool,
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        let shifted = if self.ahead {
            now.checked_add(self.offset)
        } else {
            now.checked_sub(self.offset)
        };
        shifted.unwrap_or(now)
    }
}

/// Maps an upstream (Envoy cluster) name given to `proxy_http_call` to an address.
pub trait Upstreams: Send + Sync {
    /// The address of `cluster`, or `None` when unknown (`BAD_ARGUMENT`).
    fn resolve(&self, cluster: &str) -> Option<SocketAddr>;
}

/// A fixed table of clusters.
#[derive(Debug, Default, Clone)]
pub struct StaticUpstreams {
    clusters: HashMap<String, SocketAddr>,
}

impl StaticUpstreams {
    /// No clusters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name` → `addr`.
    pub fn with(mut self, name: &str, addr: SocketAddr) -> Self {
        self.clusters.insert(name.to_owned(), addr);
        self
    }
}

impl Upstreams for StaticUpstreams {
    fn resolve(&self, cluster: &str) -> Option<SocketAddr> {
        self.clusters.get(cluster).copied()
    }
}

/// One line a plugin logged (through `proxy_log` or WASI stdout/stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Level.
    pub level: LogLevel,
    /// The plugin's name.
    pub plugin: String,
    /// Text.
    pub message: String,
}

/// Captured plugin log lines (bounded: the oldest are dropped past `capacity`).
#[derive(Debug)]
pub struct LogSink {
    lines: Mutex<VecDeque<LogLine>>,
    capacity: usize,
}

impl Default for LogSink {
    fn default() -> Self {
        Self::with_capacity(10_000)
    }
}

impl LogSink {
    /// A sink keeping at most `capacity` lines.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            lines: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    pub(crate) fn push(&self, line: LogLine) {
        match line.level {
            LogLevel::Trace => tracing::trace!(plugin = %line.plugin, "{}", line.message),
            LogLevel::Debug => tracing::debug!(plugin = %line.plugin, "{}", line.message),
            LogLevel::Info => tracing::info!(plugin = %line.plugin, "{}", line.message),
            LogLevel::Warn => tracing::warn!(plugin = %line.plugin, "{}", line.message),
            LogLevel::Error | LogLevel::Critical => {
                tracing::error!(plugin = %line.plugin, "{}", line.message);
            }
        }
        let mut lines = match self.lines.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if lines.len() >= self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// A copy of the captured lines, oldest first.
    pub fn lines(&self) -> Vec<LogLine> {
        match self.lines.lock() {
            Ok(g) => g.iter().cloned().collect(),
            Err(p) => p.into_inner().iter().cloned().collect(),
        }
    }
}

/// Key → (value, CAS version).
type SharedEntries = HashMap<Vec<u8>, (Vec<u8>, u32)>;

/// Shared key-value data (`proxy_get_shared_data` / `proxy_set_shared_data`)
/// with compare-and-swap versions; shared by every instance of one proxy.
#[derive(Debug, Default)]
pub struct SharedData {
    entries: Mutex<SharedEntries>,
}

impl SharedData {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedEntries> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The value and its CAS version.
    pub fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.lock().get(key).cloned()
    }

    /// Sets `key`; with a non-zero `cas` the update happens only if it matches
    /// the current version.
    pub fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Status {
        let mut entries = self.lock();
        match entries.get_mut(key) {
            Some((stored, version)) => {
                if cas != 0 && cas != *version {
                    return Status::CasMismatch;
                }
                *stored = value.to_vec();
                *version = version.wrapping_add(1).max(1);
            }
            None => {
                entries.insert(key.to_vec(), (value.to_vec(), 1));
            }
        }
        Status::Ok
    }
}

/// What one proxy shares among the plugin instances it runs.
#[derive(Clone)]
pub struct HostEnv {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Shared data.
    pub shared: Arc<SharedData>,
    /// Captured logs.
    pub logs: Arc<LogSink>,
    /// The clock callbacks see.
    pub clock: Arc<dyn Clock>,
    /// Where `proxy_http_call` goes.
    pub upstreams: Arc<dyn Upstreams>,
}

impl Default for HostEnv {
    fn default() -> Self {
        Self {
            metrics: Arc::new(Metrics::new()),
            shared: Arc::new(SharedData::new()),
            logs: Arc::new(LogSink::default()),
            clock: Arc::new(SystemClock),
            upstreams: Arc::new(StaticUpstreams::new()),
        }
    }
}

impl std::fmt::Debug for HostEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEnv").finish_non_exhaustive()
    }
}

/// A local reply the plugin asked for with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u32,
    /// Status code details (Envoy's `response_code_details`).
    pub details: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// An HTTP call the plugin dispatched and the host has yet to perform.
#[derive(Debug, Clone)]
pub struct HttpCallRequest {
    /// The token the plugin was given.
    pub token: u32,
    /// The cluster name.
    pub upstream: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Headers, with `:method`, `:path`, `:authority`.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Timeout in milliseconds.
    pub timeout_ms: u32,
}

/// The answer to an HTTP call; `None` where a call failed.
#[derive(Debug, Clone, Default)]
pub struct HttpCallResponse {
    /// Headers, with `:status`.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, String)>,
}

/// State of one context (root, HTTP stream or TCP stream).
#[derive(Debug, Default)]
pub(crate) struct ContextState {
    pub props: Properties,
    pub request_headers: Pairs,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_trailers: Pairs,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub downstream_data: Vec<u8>,
    pub upstream_data: Vec<u8>,
    pub local_response: Option<LocalResponse>,
    pub continued_request: bool,
    pub continued_response: bool,
    pub continued_downstream: bool,
    pub closed: bool,
    pub is_http: bool,
}

/// The wasmtime store's data for one plugin instance.
pub(crate) struct HostState {
    pub memory: Option<Memory>,
    pub alloc: Option<std::sync::Arc<TypedFunc<i32, i32>>>,
    pub plugin_name: String,
    pub effective: u32,
    pub contexts: ContextMap,
    pub root_props: Properties,
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub env: HostEnv,
    pub log_level: LogLevel,
    pub pending_calls: Vec<HttpCallRequest>,
    pub next_token: u32,
    pub call_response: Option<HttpCallResponse>,
    pub tick_period_ms: u32,
    /// The time of the callback running now: read from the clock when the
    /// plugin first asks for it, then frozen until the callback returns.
    pub now: Option<SystemTime>,
    pub started: Instant,
    pub done_requested: bool,
    pub unimplemented_calls: Vec<String>,
    /// Reused for answers copied out to the guest (property and header
    /// reads), so those calls allocate nothing on the host.
    pub scratch: Vec<u8>,
}

impl HostState {
    /// The current callback's time (see [`HostState::now`]).
    pub fn now(&mut self) -> SystemTime {
        match self.now {
            Some(t) => t,
            None => {
                let t = self.env.clock.now();
                self.now = Some(t);
                t
            }
        }
    }
}

/// Open contexts by ID. IDs are small integers the host hands out, so they
/// hash with one multiplication (every host call looks its context up).
pub(crate) type ContextMap = HashMap<u32, ContextState, BuildHasherDefault<ContextIdHasher>>;

/// [`ContextMap`]'s hasher: Fibonacci hashing of the ID.
#[derive(Default)]
pub(crate) struct ContextIdHasher(u64);

impl Hasher for ContextIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
