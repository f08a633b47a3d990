//! The dashboard page on the admin port: `/dashboard` (one page, its script
//! and stylesheet compiled into the binary) and `/v1/status`, the JSON it
//! reads next to `/metrics` and `/readyz`.
//!
//! It is for an operator without Grafana at hand (`kubectl port-forward`
//! to one replica during an incident): what this replica issues and
//! refuses, how close it is to its load bounds, which roots it publishes and
//! where a rotation stands, what its ledger holds. It shows nothing
//! `/metrics` and the bundle routes do not already give any pod that
//! reaches the admin port: aggregates, public certificates, no identities.
//!
//! The page runs no inline script and loads nothing from elsewhere; the
//! Content-Security-Policy says so, and every value it shows is set as
//! text, never parsed as markup (a CA subject is operator input).

pub mod fleet;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::bundle::BundleChannel;
use crate::bundle::rotation::Phase;
use crate::bundle::rotation::live::RotatingBuiltin;
use crate::issuer::Issuer;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// What the page may do: its own script, style and requests to this
/// origin, and compiling the playground's WebAssembly (`wasm-unsafe-eval`
/// allows WebAssembly compilation only, not JavaScript `eval`); no inline
/// script, no other origin, no framing, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The largest playground module [`load_playground`] accepts.
pub const MAX_PLAYGROUND_BYTES: u64 = 16 << 20;

/// `[dashboard]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// The policy playground's module (`meshward_playground.wasm`, built by
    /// `scripts/playground`): the filter's policy core, run in the browser
    /// on a policy pasted into the page. Absent: the page shows no
    /// playground.
    pub playground_wasm: Option<PathBuf>,
    /// Every replica's admin port for the fleet view (`/v1/fleet`):
    /// `host:port` entries, each resolved again on every gather, so a
    /// headless Service's name gives every ready replica. Empty: no fleet
    /// view.
    pub fleet: Vec<String>,
    /// How long one replica may take to answer one request.
    #[serde(with = "crate::config::human")]
    pub fleet_timeout: Duration,
    /// At most this many replicas are asked (the first by address).
    pub fleet_max_replicas: usize,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            playground_wasm: None,
            fleet: Vec::new(),
            fleet_timeout: Duration::from_secs(2),
            fleet_max_replicas: 32,
        }
    }
}

impl DashboardConfig {
    /// Refuses a fleet entry that is not `host:port`, a timeout outside
    /// 100 ms – 30 s and a replica cap outside 1 – 256.
    pub fn validate(&self) -> Result<(), String> {
        for t in &self.fleet {
            fleet::check_target(t)?;
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(30)).contains(&self.fleet_timeout) {
            return Err(format!(
                "dashboard.fleet_timeout {} is outside 100ms-30s",
                humantime::format_duration(self.fleet_timeout)
            ));
        }
        if !(1..=256).contains(&self.fleet_max_replicas) {
            return Err(format!(
                "dashboard.fleet_max_replicas {} is outside 1-256",
                self.fleet_max_replicas
            ));
        }
        Ok(())
    }

    /// The fleet view's settings, when `fleet` names any replica.
    pub fn fleet_settings(&self) -> Option<fleet::FleetSettings> {
        (!self.fleet.is_empty()).then(|| fleet::FleetSettings {
            targets: self.fleet.clone(),
            timeout: self.fleet_timeout,
            max_replicas: self.fleet_max_replicas,
        })
    }
}

/// Why the playground module was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlaygroundError {
    /// The file could not be read.
    #[error("dashboard.playground_wasm {path}: {source}")]
    Read {
        /// The configured path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a WebAssembly module this page can run.
    #[error("dashboard.playground_wasm {path}: {reason}")]
    Invalid {
        /// The configured path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Read and check the playground module: a WebAssembly binary (magic and
/// version 1) of at most [`MAX_PLAYGROUND_BYTES`], exporting the page's ABI.
pub fn load_playground(path: &Path) -> Result<Arc<[u8]>, PlaygroundError> {
    let name = path.display().to_string();
    let invalid = |reason: String| PlaygroundError::Invalid {
        path: name.clone(),
        reason,
    };
    let read = |source| PlaygroundError::Read {
        path: name.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_PLAYGROUND_BYTES {
        return Err(invalid(format!(
            "{size} bytes, more than the {MAX_PLAYGROUND_BYTES} allowed"
        )));
    }
    let bytes = std::fs::read(path).map_err(read)?;
    if bytes.get(..8) != Some(b"\0asm\x01\0\0\0".as_slice()) {
        return Err(invalid("not a WebAssembly module (version 1)".into()));
    }
    for export in ["meshward_alloc", "meshward_evaluate", "meshward_free"] {
        if !bytes.windows(export.len()).any(|w| w == export.as_bytes()) {
            return Err(invalid(format!(
                "does not export {export}: build it with scripts/playground"
            )));
        }
    }
    Ok(bytes.into())
}

/// Which ledger this replica records into, as the page names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    /// `[ledger] enabled = false`.
    Off,
    /// The replica's own SQLite file.
    Sqlite,
    /// `[ledger.postgres]`, shared by every replica.
    Postgres,
}

/// What `/v1/status` is built from.
#[derive(Clone)]
pub struct DashboardState {
    /// The signing backend.
    pub issuer: Arc<dyn Issuer>,
    /// The published trust bundle.
    pub bundle: BundleChannel,
    /// The built-in CA's rotation, when the backend is builtin.
    pub rotation: Option<Arc<RotatingBuiltin>>,
    /// Where issuances are recorded.
    pub ledger: LedgerKind,
    /// This replica's name (the pod name in a StatefulSet).
    pub replica: String,
    /// Random per process: tells this process from any other, restarts
    /// and replicas sharing a name included.
    pub instance: String,
    /// When this process started serving.
    pub started_at: OffsetDateTime,
    /// The policy playground's module, when configured.
    pub playground: Option<Arc<[u8]>>,
    /// The fleet view, when `[dashboard] fleet` is set.
    pub fleet: Option<Arc<fleet::Fleet>>,
}

/// `/v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The signer's version.
    pub version: &'static str,
    /// This replica's name.
    pub replica: String,
    /// Random per process (see [`DashboardState::instance`]).
    pub instance: String,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix seconds, the signer's clock.
    pub now: i64,
    /// The trust domain certificates are issued in.
    pub trust_domain: String,
    /// `builtin`, `cacerts` or `vault`.
    pub backend: &'static str,
    /// Where issuances are recorded.
    pub ledger: LedgerKind,
    /// The certificate that signs leaves.
    pub signing_ca: Validity,
    /// The bundle as published.
    pub bundle: BundleStatus,
    /// The built-in CA's root rotation (absent for other backends).
    pub rotation: Option<Phase>,
    /// Why the rotation state could not be read, if it could not.
    pub rotation_error: Option<String>,
    /// Whether `/dashboard/playground.wasm` is served.
    pub playground: bool,
    /// Whether `/v1/fleet` is served.
    pub fleet: bool,
}

/// A random process instance id for [`DashboardState::instance`].
pub fn new_instance_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// A validity window in Unix seconds.
#[derive(Debug, Serialize)]
pub struct Validity {
    /// notBefore.
    pub not_before: i64,
    /// notAfter.
    pub not_after: i64,
}

/// The published trust bundle.
#[derive(Debug, Serialize)]
pub struct BundleStatus {
    /// Increases with every published change.
    pub sequence: u64,
    /// Its roots, in bundle order.
    pub roots: Vec<RootStatus>,
}

/// One root of the bundle.
#[derive(Debug, Serialize)]
pub struct RootStatus {
    /// The subject as RFC 4514 text (`"?"` if the certificate does not
    /// parse, which the bundle's own checks should have prevented).
    pub subject: String,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
    /// Its validity.
    pub validity: Option<Validity>,
}

impl DashboardState {
    /// The status as of now.
    pub fn status(&self) -> Status {
        let bundle = self.bundle.current();
        let signing = self.issuer.signing_validity();
        let (rotation, rotation_error) = match &self.rotation {
            None => (None, None),
            Some(ca) => match ca.dir().phase() {
                Ok(phase) => (Some(phase), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        Status {
            version: env!("CARGO_PKG_VERSION"),
            replica: self.replica.clone(),
            instance: self.instance.clone(),
            started_at: self.started_at.unix_timestamp(),
            now: OffsetDateTime::now_utc().unix_timestamp(),
            trust_domain: bundle.trust_domain().to_string(),
            backend: self.issuer.name(),
            ledger: self.ledger,
            signing_ca: Validity {
                not_before: signing.not_before.unix_timestamp(),
                not_after: signing.not_after.unix_timestamp(),
            },
            bundle: BundleStatus {
                sequence: bundle.sequence(),
                roots: bundle.roots().iter().map(|der| root_status(der)).collect(),
            },
            rotation,
            rotation_error,
            playground: self.playground.is_some(),
            fleet: self.fleet.is_some(),
        }
    }
}

fn root_status(der: &[u8]) -> RootStatus {
    let sha256 = hex::encode(Sha256::digest(der));
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => RootStatus {
            subject: cert.subject().to_string(),
            sha256,
            validity: Some(Validity {
                not_before: cert.validity().not_before.timestamp(),
                not_after: cert.validity().not_after.timestamp(),
            }),
        },
        Err(_) => RootStatus {
            subject: "?".to_string(),
            sha256,
            validity: None,
        },
    }
}

/// `/` (redirects here), `/dashboard`, its assets, `/v1/status` and
/// `/v1/fleet`.
pub fn routes(state: DashboardState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route(
            "/dashboard",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/dashboard/playground.wasm", get(playground))
        .route("/v1/status", get(status))
        .route("/v1/fleet", get(fleet_view))
        .with_state(state)
}

async fn status(State(state): State<DashboardState>) -> Response {
    let mut response = axum::Json(state.status()).into_response();
    harden(&mut response);
    response
}

async fn fleet_view(State(state): State<DashboardState>) -> Response {
    let mut response = match state.fleet {
        Some(fleet) => axum::Json(fleet.view().await.as_ref().clone()).into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "no fleet view on this signer: set dashboard.fleet to the replicas' admin ports\n",
        )
            .into_response(),
    };
    harden(&mut response);
    response
}

async fn playground(State(state): State<DashboardState>) -> Response {
    let mut response = match state.playground {
        Some(module) => (
            [(header::CONTENT_TYPE, "application/wasm")],
            axum::body::Bytes::from_owner(module),
        )
            .into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "no policy playground on this signer: set dashboard.playground_wasm\n",
        )
            .into_response(),
    };
    harden(&mut response);
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    harden(&mut response);
    response
}

/// The headers every dashboard response carries.
fn harden(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
