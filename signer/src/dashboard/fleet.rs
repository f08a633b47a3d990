//! The fleet view (`/v1/fleet`): every replica's status and headline
//! counters, gathered by the replica the operator reached.
//!
//! Behind a Service, a `kubectl port-forward` reaches one replica, and each
//! replica's page shows only itself. With `[dashboard] fleet` set to the
//! replicas' admin ports — a headless Service's name gives every ready pod,
//! re-resolved on each gather — this replica asks each of them for
//! `/v1/status`, `/readyz` and `/metrics` and answers with one row per
//! replica: ready, version, backend, the roots it publishes, its rotation
//! phase, issued and refused since it started and per second since the
//! previous gather, its open connections and `WatchBundle` streams. It also says whether every replica publishes the
//! same roots and runs the same version: a replica left behind during a
//! root rotation or a rollout is the first thing to look for.
//!
//! Who is asked is configuration only, never the request. The answer is
//! gathered at most once per [`FLEET_CACHE`] (concurrent page loads wait
//! for the same gather), so any number of open pages costs each peer at
//! most three requests per period; each peer has `fleet_timeout` and a cap
//! on what it may send, and a peer that fails is a row with its error.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A gathered view is served this long before the peers are asked again
/// (the page refreshes every 5 s).
pub const FLEET_CACHE: Duration = Duration::from_secs(5);

/// The most a peer's `/v1/status` may hold.
pub const MAX_STATUS_BYTES: usize = 256 << 10;

/// The most a peer's `/metrics` may hold.
pub const MAX_METRICS_BYTES: usize = 8 << 20;

/// The most a peer's `/readyz` may hold.
const MAX_READY_BYTES: usize = 4 << 10;

/// The counters the fleet view reads from each replica's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// `requests_total{outcome="issued"}` since the replica started.
    pub issued: f64,
    /// `requests_total` with any other outcome.
    pub refused: f64,
    /// Open gRPC connections now.
    pub grpc_connections: f64,
    /// Open `WatchBundle` streams now.
    pub bundle_watchers: f64,
}

impl Counters {
    /// Read from a Prometheus / OpenMetrics exposition. Series the view
    /// does not use, comments and malformed lines are skipped.
    pub fn from_exposition(text: &str) -> Self {
        let mut c = Counters::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            // An exemplar follows " # " after the value.
            let sample = line.split(" # ").next().unwrap_or(line);
            let Some((series, value)) = sample.trim_end().rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if !value.is_finite() {
                continue;
            }
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels),
                None => (series, ""),
            };
            match name.strip_prefix("meshward_signer_") {
                Some("requests_total") if labels.contains("outcome=\"issued\"") => {
                    c.issued += value;
                }
                Some("requests_total") => c.refused += value,
                Some("grpc_connections") => c.grpc_connections += value,
                Some("bundle_watchers") => c.bundle_watchers += value,
                _ => {}
            }
        }
        c
    }

    fn add(&mut self, other: &Counters) {
        self.issued += other.issued;
        self.refused += other.refused;
        self.grpc_connections += other.grpc_connections;
        self.bundle_watchers += other.bundle_watchers;
    }
}

/// Issued and refused per second between two gathers of one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Certificates issued per second.
    pub issued_per_second: f64,
    /// Requests refused per second.
    pub refused_per_second: f64,
    /// The seconds between the two gathers.
    pub over_seconds: f64,
}

/// Gathers closer together than this give no rate (a count over a
/// fraction of a second says little).
const MIN_RATE_WINDOW: Duration = Duration::from_secs(1);

/// One replica's counters as read at one gather.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    counters: Counters,
}

impl Rates {
    /// From the previous and the current sample of the same process. No
    /// rate when the window is too short or a counter went down (the
    /// counters of a process do not: the address now answers for another
    /// one, without an instance id to tell).
    fn between(before: &Sample, now: &Sample) -> Option<Self> {
        let window = now.at.checked_duration_since(before.at)?;
        if window < MIN_RATE_WINDOW {
            return None;
        }
        let issued = now.counters.issued - before.counters.issued;
        let refused = now.counters.refused - before.counters.refused;
        if issued < 0.0 || refused < 0.0 {
            return None;
        }
        let secs = window.as_secs_f64();
        Some(Self {
            issued_per_second: issued / secs,
            refused_per_second: refused / secs,
            over_seconds: secs,
        })
    }
}

/// What the fleet view keeps of a replica's `/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its version.
    pub version: String,
    /// Its name (the pod name).
    pub replica: String,
    /// Its process instance id (empty from a signer that does not say).
    pub instance: String,
    /// Unix seconds.
    pub started_at: i64,
    /// `builtin`, `cacerts` or `vault`.
    pub backend: String,
    /// `off`, `sqlite` or `postgres`.
    pub ledger: String,
    /// Its signing CA's notAfter, Unix seconds.
    pub signing_ca_not_after: i64,
    /// Its bundle's sequence number.
    pub bundle_sequence: u64,
    /// SHA-256 of each root it publishes, in bundle order.
    pub roots: Vec<String>,
    /// Its rotation phase, as its `/v1/status` says it.
    pub rotation: Option<serde_json::Value>,
}

impl PeerStatus {
    /// From a `/v1/status` body.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Validity {
            not_after: i64,
        }
        #[derive(Deserialize)]
        struct Root {
            sha256: String,
        }
        #[derive(Deserialize)]
        struct Bundle {
            sequence: u64,
            roots: Vec<Root>,
        }
        #[derive(Deserialize)]
        struct Status {
            version: String,
            replica: String,
            #[serde(default)]
            instance: String,
            started_at: i64,
            backend: String,
            ledger: String,
            signing_ca: Validity,
            bundle: Bundle,
            #[serde(default)]
            rotation: Option<serde_json::Value>,
        }
        let s: Status =
            serde_json::from_slice(body).map_err(|e| format!("/v1/status is not its JSON: {e}"))?;
        Ok(Self {
            version: s.version,
            replica: s.replica,
            instance: s.instance,
            started_at: s.started_at,
            backend: s.backend,
            ledger: s.ledger,
            signing_ca_not_after: s.signing_ca.not_after,
            bundle_sequence: s.bundle.sequence,
            roots: s.bundle.roots.into_iter().map(|r| r.sha256).collect(),
            rotation: s.rotation,
        })
    }
}

/// One replica as the fleet view saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaView {
    /// The address it was asked at.
    pub address: String,
    /// It is the replica serving this view.
    pub this_replica: bool,
    /// `/readyz` answered 200 (absent when it could not be asked).
    pub ready: Option<bool>,
    /// Its status, when it answered.
    pub status: Option<PeerStatus>,
    /// Its counters, when its `/metrics` answered.
    pub counters: Option<Counters>,
    /// Per second since the previous gather, when both read its counters
    /// from the same process.
    pub rates: Option<Rates>,
    /// What went wrong asking it, if anything did.
    pub error: Option<String>,
}

/// `/v1/fleet`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetView {
    /// Unix seconds, this replica's clock.
    pub gathered_at: i64,
    /// `[dashboard] fleet` as configured.
    pub targets: Vec<String>,
    /// Entries that did not resolve, with why.
    pub resolve_errors: Vec<String>,
    /// More addresses resolved than `fleet_max_replicas`; the rest were not asked.
    pub truncated: bool,
    /// One row per address asked, in address order.
    pub replicas: Vec<ReplicaView>,
    /// Rows whose status was read.
    pub answered: usize,
    /// Every replica that answered publishes the same roots.
    pub roots_agree: bool,
    /// Every replica that answered runs the same version.
    pub versions_agree: bool,
    /// The counters summed over the replicas that answered.
    pub totals: Counters,
    /// The rates summed over the replicas that have one (absent when none
    /// has: the first gather, or every replica restarted since).
    pub total_rates: Option<Rates>,
}

/// `[dashboard] fleet`, `fleet_timeout`, `fleet_max_replicas`, checked.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// `host:port` entries.
    pub targets: Vec<String>,
    /// Per peer request.
    pub timeout: Duration,
    /// Addresses asked at most.
    pub max_replicas: usize,
}

/// Checks one `[dashboard] fleet` entry: `host:port`, with a port.
pub fn check_target(target: &str) -> Result<(), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("dashboard.fleet {target:?}: not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!("dashboard.fleet {target:?}: not host:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "dashboard.fleet {target:?}: port {port:?} is not 1-65535"
        )),
    }
}

/// The last view, and each process's counters at the gather before, keyed
/// by its instance id (its address when it has none).
#[derive(Default)]
struct State {
    view: Option<(Instant, Arc<FleetView>)>,
    samples: HashMap<String, Sample>,
}

/// Gathers the fleet view (see the module's comments).
pub struct Fleet {
    settings: FleetSettings,
    own_instance: String,
    client: reqwest::Client,
    state: tokio::sync::Mutex<State>,
}

impl Fleet {
    /// For these settings, on the process whose `/v1/status` instance id
    /// is `own_instance` (so its own row is marked).
    pub fn new(settings: FleetSettings, own_instance: String) -> Result<Self, String> {
        for t in &settings.targets {
            check_target(t)?;
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .pool_max_idle_per_host(1)
            .user_agent(concat!("meshward-signer-fleet/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("dashboard.fleet HTTP client: {e}"))?;
        Ok(Self {
            settings,
            own_instance,
            client,
            state: tokio::sync::Mutex::new(State::default()),
        })
    }

    /// The view, gathered again when the last one is older than
    /// [`FLEET_CACHE`].
    pub async fn view(&self) -> Arc<FleetView> {
        let mut state = self.state.lock().await;
        if let Some((at, view)) = state.view.as_ref()
            && at.elapsed() < FLEET_CACHE
        {
            return view.clone();
        }
        let mut view = self.gather().await;
        state.samples = with_rates(&mut view, &state.samples, Instant::now());
        let view = Arc::new(view);
        state.view = Some((Instant::now(), view.clone()));
        view
    }

    async fn resolve(&self) -> (Vec<SocketAddr>, Vec<String>) {
        let mut addresses = BTreeSet::new();
        let mut errors = Vec::new();
        for target in &self.settings.targets {
            let lookup = tokio::net::lookup_host(target.as_str());
            match tokio::time::timeout(self.settings.timeout, lookup).await {
                Ok(Ok(found)) => addresses.extend(found),
                Ok(Err(e)) => errors.push(format!("{target}: {e}")),
                Err(_) => errors.push(format!(
                    "{target}: not resolved within {}",
                    humantime::format_duration(self.settings.timeout)
                )),
            }
        }
        (addresses.into_iter().collect(), errors)
    }

    async fn gather(&self) -> FleetView {
        let (mut addresses, resolve_errors) = self.resolve().await;
        let truncated = addresses.len() > self.settings.max_replicas;
        addresses.truncate(self.settings.max_replicas);
        let mut asks = tokio::task::JoinSet::new();
        for (i, address) in addresses.iter().copied().enumerate() {
            let client = self.client.clone();
            asks.spawn(async move { (i, ask(&client, address).await) });
        }
        let mut replicas: Vec<Option<ReplicaView>> = vec![None; addresses.len()];
        while let Some(done) = asks.join_next().await {
            if let Ok((i, mut row)) = done {
                row.this_replica = row
                    .status
                    .as_ref()
                    .is_some_and(|s| s.instance == self.own_instance);
                if let Some(slot) = replicas.get_mut(i) {
                    *slot = Some(row);
                }
            }
        }
        let replicas: Vec<ReplicaView> = replicas
            .into_iter()
            .zip(&addresses)
            .map(|(row, address)| {
                row.unwrap_or_else(|| ReplicaView {
                    address: address.to_string(),
                    this_replica: false,
                    ready: None,
                    status: None,
                    counters: None,
                    rates: None,
                    error: Some("asking it failed".into()),
                })
            })
            .collect();
        summarize(
            self.settings.targets.clone(),
            resolve_errors,
            truncated,
            replicas,
        )
    }
}

/// Fills in each row's rates (and their sum) from the samples of the
/// previous gather; returns this gather's samples, for the next one. A
/// process not seen this time is forgotten, so the map never holds more
/// than `fleet_max_replicas` entries.
fn with_rates(
    view: &mut FleetView,
    before: &HashMap<String, Sample>,
    at: Instant,
) -> HashMap<String, Sample> {
    let mut samples = HashMap::new();
    let mut total: Option<Rates> = None;
    for row in &mut view.replicas {
        let Some(counters) = row.counters else {
            continue;
        };
        let key = match row.status.as_ref() {
            Some(s) if !s.instance.is_empty() => format!("instance {}", s.instance),
            _ => format!("address {}", row.address),
        };
        let now = Sample { at, counters };
        row.rates = before.get(&key).and_then(|b| Rates::between(b, &now));
        if let Some(r) = row.rates {
            let t = total.get_or_insert(Rates {
                over_seconds: r.over_seconds,
                ..Rates::default()
            });
            t.issued_per_second += r.issued_per_second;
            t.refused_per_second += r.refused_per_second;
            t.over_seconds = t.over_seconds.min(r.over_seconds);
        }
        samples.insert(key, now);
    }
    view.total_rates = total;
    samples
}

/// The view's summary fields from its rows.
pub fn summarize(
    targets: Vec<String>,
    resolve_errors: Vec<String>,
    truncated: bool,
    replicas: Vec<ReplicaView>,
) -> FleetView {
    let statuses: Vec<&PeerStatus> = replicas.iter().filter_map(|r| r.status.as_ref()).collect();
    let root_sets: BTreeSet<BTreeSet<&str>> = statuses
        .iter()
        .map(|s| s.roots.iter().map(String::as_str).collect())
        .collect();
    let versions: BTreeSet<&str> = statuses.iter().map(|s| s.version.as_str()).collect();
    let mut totals = Counters::default();
    for c in replicas.iter().filter_map(|r| r.counters.as_ref()) {
        totals.add(c);
    }
    FleetView {
        gathered_at: OffsetDateTime::now_utc().unix_timestamp(),
        targets,
        resolve_errors,
        truncated,
        answered: statuses.len(),
        roots_agree: root_sets.len() <= 1,
        versions_agree: versions.len() <= 1,
        totals,
        total_rates: None,
        replicas,
    }
}

/// Asks one replica for its status, readiness and counters, concurrently.
async fn ask(client: &reqwest::Client, address: SocketAddr) -> ReplicaView {
    let base = format!("http://{address}");
    let (status_url, ready_url, metrics_url) = (
        format!("{base}/v1/status"),
        format!("{base}/readyz"),
        format!("{base}/metrics"),
    );
    let (status, ready, metrics) = tokio::join!(
        fetch(client, &status_url, MAX_STATUS_BYTES),
        fetch(client, &ready_url, MAX_READY_BYTES),
        fetch(client, &metrics_url, MAX_METRICS_BYTES),
    );
    let mut errors = Vec::new();
    let status = ok_body(status, "/v1/status", &mut errors).and_then(|body| {
        PeerStatus::from_json(&body)
            .map_err(|e| errors.push(e))
            .ok()
    });
    let ready = match ready {
        Ok((code, _)) => Some(code == 200),
        Err(e) => {
            errors.push(format!("/readyz: {e}"));
            None
        }
    };
    let counters = ok_body(metrics, "/metrics", &mut errors)
        .map(|body| Counters::from_exposition(&String::from_utf8_lossy(&body)));
    // The same failure on all three routes is said once.
    errors.dedup_by(|a, b| a.split_once(": ").map(|x| x.1) == b.split_once(": ").map(|x| x.1));
    ReplicaView {
        address: address.to_string(),
        this_replica: false,
        ready,
        status,
        counters,
        rates: None,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// The body of a 200 answer from `route`; anything else is said in `errors`.
fn ok_body(
    answer: Result<(u16, Vec<u8>), String>,
    route: &str,
    errors: &mut Vec<String>,
) -> Option<Vec<u8>> {
    match answer {
        Ok((200, body)) => Some(body),
        Ok((code, _)) => {
            errors.push(format!("{route} answered {code}"));
            None
        }
        Err(e) => {
            errors.push(format!("{route}: {e}"));
            None
        }
    }
}

/// GET `url`, reading at most `cap` bytes of its body.
async fn fetch(client: &reqwest::Client, url: &str, cap: usize) -> Result<(u16, Vec<u8>), String> {
    let mut response = client.get(url).send().await.map_err(describe)?;
    let code = response.status().as_u16();
    if let Some(len) = response.content_length()
        && len > cap as u64
    {
        return Err(format!(
            "its answer of {len} bytes is over the {cap} allowed"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe)? {
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(format!(
                "its answer is over the {cap} bytes allowed; cut off"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((code, body))
}

/// A reqwest error with its causes (`connection refused`, not only "error
/// sending request").
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer in time (dashboard.fleet_timeout)".to_string();
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "# HELP meshward_signer_requests Requests.\n\
# TYPE meshward_signer_requests counter\n\
meshward_signer_requests_total{outcome=\"issued\"} 40\n\
meshward_signer_requests_total{outcome=\"unauthenticated\"} 3\n\
meshward_signer_requests_total{outcome=\"rate_limited\"} 2 # {trace_id=\"x\"} 1.0\n\
meshward_signer_grpc_connections 7\n\
meshward_signer_grpc_connections_max 8192\n\
meshward_signer_bundle_watchers 5\n\
meshward_signer_requests_total{outcome=\"internal\"} NaN\n\
garbage line\n\
# EOF\n";

    #[test]
    fn counters_are_read_from_the_exposition_and_nothing_else() {
        let c = Counters::from_exposition(EXPOSITION);
        assert_eq!(
            c,
            Counters {
                issued: 40.0,
                refused: 5.0,
                grpc_connections: 7.0,
                bundle_watchers: 5.0,
            }
        );
    }

    fn row(address: &str, roots: &[&str], version: &str) -> ReplicaView {
        ReplicaView {
            address: address.into(),
            this_replica: false,
            ready: Some(true),
            status: Some(PeerStatus {
                version: version.into(),
                replica: address.into(),
                instance: address.into(),
                started_at: 0,
                backend: "builtin".into(),
                ledger: "sqlite".into(),
                signing_ca_not_after: 0,
                bundle_sequence: 1,
                roots: roots.iter().map(|r| (*r).to_string()).collect(),
                rotation: None,
            }),
            counters: Some(Counters {
                issued: 1.0,
                ..Counters::default()
            }),
            rates: None,
            error: None,
        }
    }

    fn counted(view: &mut FleetView, address: &str, issued: f64, refused: f64) {
        let row = view
            .replicas
            .iter_mut()
            .find(|r| r.address == address)
            .unwrap();
        row.counters = Some(Counters {
            issued,
            refused,
            ..Counters::default()
        });
    }

    #[test]
    fn rates_are_per_process_and_a_restart_or_a_short_window_gives_none() {
        let t0 = Instant::now();
        let view = |rows| summarize(vec![], vec![], false, rows);
        let mut first = view(vec![row("a", &["r"], "1"), row("b", &["r"], "1")]);
        counted(&mut first, "a", 10.0, 2.0);
        counted(&mut first, "b", 5.0, 0.0);
        let samples = with_rates(&mut first, &HashMap::new(), t0);
        assert!(first.replicas.iter().all(|r| r.rates.is_none()));
        assert_eq!(first.total_rates, None);

        // Five seconds on: a issued 20 and refused 5 more; b restarted (a
        // new instance id, counters from zero).
        let mut second = view(vec![row("a", &["r"], "1"), row("b", &["r"], "1")]);
        counted(&mut second, "a", 30.0, 7.0);
        counted(&mut second, "b", 1.0, 0.0);
        second.replicas[1].status.as_mut().unwrap().instance = "b-restarted".into();
        let later = with_rates(&mut second, &samples, t0 + Duration::from_secs(5));
        let a = second.replicas[0].rates.unwrap();
        assert_eq!(
            (a.issued_per_second, a.refused_per_second, a.over_seconds),
            (4.0, 1.0, 5.0)
        );
        assert_eq!(
            second.replicas[1].rates, None,
            "a restarted process has no rate yet"
        );
        assert_eq!(second.total_rates, Some(a));
        assert_eq!(later.len(), 2, "the old instance of b is forgotten");

        // Counters going down at the same key (no instance id) are not a rate.
        let mut third = second.clone();
        counted(&mut third, "a", 3.0, 7.0);
        with_rates(&mut third, &later, t0 + Duration::from_secs(10));
        assert_eq!(third.replicas[0].rates, None);

        // Gathers under a second apart give none either.
        let mut quick = second.clone();
        with_rates(&mut quick, &later, t0 + Duration::from_millis(5500));
        assert!(quick.replicas.iter().all(|r| r.rates.is_none()));
    }

    #[test]
    fn a_replica_publishing_other_roots_is_flagged_and_order_does_not_matter() {
        let agree = summarize(
            vec![],
            vec![],
            false,
            vec![row("a", &["r1", "r2"], "1"), row("b", &["r2", "r1"], "1")],
        );
        assert!(agree.roots_agree && agree.versions_agree);
        assert_eq!((agree.answered, agree.totals.issued), (2, 2.0));
        let behind = summarize(
            vec![],
            vec![],
            false,
            vec![row("a", &["r1", "r2"], "1"), row("b", &["r1"], "2")],
        );
        assert!(!behind.roots_agree && !behind.versions_agree);
    }

    #[test]
    fn fleet_entries_must_be_host_and_port() {
        for ok in [
            "signer-headless.istio-system.svc:15014",
            "127.0.0.1:1",
            "[::1]:15014",
        ] {
            assert_eq!(check_target(ok), Ok(()), "{ok}");
        }
        for bad in [
            "signer",
            "signer:",
            "signer:0",
            "signer:99999",
            ":15014",
            "http://a:1",
            "a/b:1",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }
}
