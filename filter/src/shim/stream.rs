//! Network (TCP) context: one decision per connection.
//!
//! The decision is taken in `on_new_connection` when the host already reports
//! `connection.mtls`. On a TLS listener the handshake may still be running at
//! accept time (Envoy's own RBAC network filter waits for the first data for
//! this reason), so a connection that does not look like mTLS yet is decided
//! on its first downstream or upstream data instead, before any byte passes.
//! A denied connection is closed. When the peer certificate's validity must
//! come from the signer's ledger, the connection is paused (no byte passes)
//! until the lookup answers or times out.

use super::host::{self, Connection, HostError, log};
use super::ledger::{self, InFlight, Lookup, Slot};
use super::metrics::Metrics;
use crate::cert::PeerCert;
use crate::config::Mode;
use crate::decision::Decision;
use crate::policy::{PeerRulesCache, Policy};
use crate::request::Request;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, LogLevel};
use std::rc::Rc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Undecided,
    /// Paused until the ledger answers (or the callout fails / times out).
    Waiting,
    Allowed,
    Closed,
}

pub struct TcpFilter {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
    in_flight: Rc<InFlight>,
    peer_rules: Rc<PeerRulesCache>,
    state: State,
    /// The connection facts kept while the ledger is asked.
    waiting: Option<(Connection, Slot)>,
}

/// What to do with the connection.
enum Outcome {
    Close(String),
    Allow,
    Wait,
}

impl TcpFilter {
    pub fn new(
        policy: Option<Rc<Policy>>,
        metrics: Rc<Metrics>,
        in_flight: Rc<InFlight>,
        peer_rules: Rc<PeerRulesCache>,
    ) -> Self {
        Self {
            policy,
            metrics,
            in_flight,
            peer_rules,
            state: State::Undecided,
            waiting: None,
        }
    }

    /// The digest is only for ledger lookups on a TCP connection (no XFCC).
    fn wants_digest(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.ledger().is_some())
    }

    fn policy(&self) -> Result<Rc<Policy>, HostError> {
        self.policy
            .clone()
            .ok_or_else(|| HostError("no valid pluginConfig loaded".into()))
    }

    /// First look: decide, or start a ledger lookup and wait.
    fn evaluate(&mut self, conn: Connection) -> Result<Outcome, HostError> {
        let policy = self.policy()?;
        let now = host::now()?;
        let mut cert = conn.peer_cert(|| Ok(None))?;
        if let Some(settings) = policy.ledger()
            && let Some(digest) = ledger::wanted(&policy, &conn, cert.as_ref())
        {
            match ledger::start(settings, digest, now, &self.metrics, &self.in_flight) {
                Lookup::Ready(found) => cert = found,
                Lookup::Dispatched(slot) => {
                    self.waiting = Some((conn, slot));
                    return Ok(Outcome::Wait);
                }
            }
        }
        Ok(self.judge(&policy, &conn, cert, now))
    }

    fn judge(
        &self,
        policy: &Policy,
        conn: &Connection,
        cert: Option<PeerCert>,
        now: crate::UnixTime,
    ) -> Outcome {
        let peer = conn.peer.with_cert(cert);
        let decision = self
            .peer_rules
            .authorize(policy, &peer, &Request::tcp(conn.port), now);
        self.metrics.decision(&decision, policy.mode(), conn.mtls);
        // Texts only for what is sent or logged: an allowed connection
        // formats nothing.
        let text = || {
            let who = conn.uri_san.as_deref().unwrap_or("(no peer identity)");
            let port = conn.port.map_or_else(|| "-".to_string(), |p| p.to_string());
            format!("{who} -> port {port}: {decision}")
        };
        if decision.blocks() {
            return Outcome::Close(text());
        }
        if decision.verdict == crate::Verdict::Deny {
            log(LogLevel::Warn, &format!("meshward: shadow deny {}", text()));
        }
        Outcome::Allow
    }

    /// Acts on an outcome; an error closes the connection.
    fn apply(&mut self, outcome: Result<Outcome, HostError>) -> Action {
        let text = match outcome {
            Ok(Outcome::Allow) => {
                self.state = State::Allowed;
                return Action::Continue;
            }
            Ok(Outcome::Wait) => {
                self.state = State::Waiting;
                return Action::Pause;
            }
            Ok(Outcome::Close(text)) => text,
            Err(HostError(why)) => {
                let decision = Decision::internal_error(why.clone());
                self.metrics.decision(&decision, Mode::Enforce, false);
                format!("cannot decide, failing closed: {why}")
            }
        };
        log(
            LogLevel::Info,
            &format!("meshward: close connection {text}"),
        );
        self.state = State::Closed;
        if let Err(status) = hostcalls::close_downstream() {
            log(
                LogLevel::Error,
                &format!("meshward: close_downstream failed: {status:?}"),
            );
        }
        Action::Pause
    }

    fn decide(&mut self) -> Action {
        let outcome = Connection::read(self.wants_digest()).and_then(|conn| self.evaluate(conn));
        self.apply(outcome)
    }

    /// The ledger answered (or the callout failed / timed out).
    fn resume(&mut self, body_size: usize) -> Result<Outcome, HostError> {
        let (conn, slot) = self.waiting.take().ok_or_else(|| {
            HostError("ledger answer for a connection not waiting for one".into())
        })?;
        let policy = self.policy()?;
        let settings = policy
            .ledger()
            .ok_or_else(|| HostError("ledger answer without ledger config".into()))?;
        let now = host::now()?;
        let cert = ledger::finish(settings, &conn, body_size, now, &self.metrics);
        drop(slot);
        Ok(self.judge(&policy, &conn, cert, now))
    }

    fn on_data(&mut self) -> Action {
        match self.state {
            State::Allowed => Action::Continue,
            State::Closed | State::Waiting => Action::Pause,
            State::Undecided => self.decide(),
        }
    }
}

impl Context for TcpFilter {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.state != State::Waiting {
            return;
        }
        let outcome = self.resume(body_size);
        if self.apply(outcome) == Action::Continue
            && let Err(status) = hostcalls::resume_downstream()
        {
            log(
                LogLevel::Error,
                &format!("meshward: resume_downstream failed: {status:?}"),
            );
        }
    }
}

impl StreamContext for TcpFilter {
    fn on_new_connection(&mut self) -> Action {
        match host::property_bool(host::prop!("connection", "mtls")) {
            // Handshake possibly not finished: decide on the first data.
            Ok(Some(false) | None) => Action::Continue,
            // mTLS already known: the connection read needs not ask again.
            Ok(Some(true)) => {
                let outcome = Connection::read_mtls_known(true, self.wants_digest())
                    .and_then(|c| self.evaluate(c));
                self.apply(outcome)
            }
            Err(_) => self.decide(),
        }
    }

    fn on_downstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        self.on_data()
    }

    fn on_upstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        self.on_data()
    }
}
