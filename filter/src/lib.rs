//! meshward filter: SPIFFE authorization and peer-certificate telemetry.
//!
//! The crate has two layers (see `filter/README.md`):
//!
//! * a **pure policy core** (every module except `shim`): no I/O, no clock, no
//!   proxy-wasm. Config JSON is parsed ([`config`]), compiled once into indexed
//!   matchers ([`policy::Policy`]) and evaluated with
//!   [`Policy::authorize`](policy::Policy::authorize)`(peer, request, now)`.
//!   It builds natively (tests, benches, the e2e host) and for wasm32.
//! * a **thin proxy-wasm shim** (`shim`, only on `wasm32-wasip1`) that reads the host's
//!   properties and headers, calls the core, and acts on the decision.
// `unsafe_code` is denied workspace-wide; in `shim` only the proxy-wasm entry
// macro and `shim::abi` (raw ABI calls) are allowed it.

pub mod cert;
pub mod config;
pub mod connection_gate;
pub mod decision;
pub mod duration;
pub mod header_pairs;
pub mod ledger;
pub mod pattern;
pub mod peer;
pub mod policy;
pub mod reference;
pub mod request;
pub mod telemetry;
pub mod xfcc;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod shim;

pub use cert::{CertSource, CertTimes, CertValidity, PeerCert};
pub use config::{Config, ConfigError, FilterType, Mode, UnknownCertAge, UpstreamConnect};
pub use decision::{Decision, Reason, Verdict};
pub use peer::{Peer, PeerIdentity};
pub use policy::Policy;
pub use request::{Protocol, Request};

/// Seconds since the Unix epoch. The core never reads a clock: callers pass `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixTime(pub i64);
