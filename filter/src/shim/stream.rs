//! Network (TCP) context: one decision per connection, taken only once the
//! downstream TLS handshake is over (see [`crate::connection_gate`] for the
//! rules and why).
//!
//! At accept the filter reads `connection.mtls`: true, or no TLS at all, and
//! the peer is judged at once. Otherwise it judges on the first downstream
//! bytes or on a tick ([`super::streams`]) that finds the peer certificate,
//! and meanwhile holds what later filters send towards the peer
//! (`on_upstream_data` returns `Pause`). With `upstreamConnect:
//! afterDecision` it also returns `Pause` from `on_new_connection`, so that
//! Envoy starts no later filter (no upstream connection, no greeting from a
//! server-first upstream, no direct response) before the decision. An
//! allowed connection whose reading was paused is continued
//! (`proxy_continue_stream(Downstream)`), a denied one closed. When the peer
//! certificate's validity must come from the signer's ledger, the
//! connection stays paused until the lookup answers or times out.

use super::host::{self, Connection, HostError, log, prop};
use super::ledger::{self, InFlight, Lookup, Slot};
use super::metrics::Metrics;
use crate::cert::PeerCert;
use crate::config::{Mode, UpstreamConnect};
use crate::connection_gate::{Gate, Handshake, Judgement, Step};
use crate::decision::Decision;
use crate::policy::{PeerRulesCache, Policy};
use crate::request::Request;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, LogLevel};
use std::rc::Rc;

pub struct TcpFilter {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
    in_flight: Rc<InFlight>,
    peer_rules: Rc<PeerRulesCache>,
    gate: Gate,
    /// The connection facts kept while the ledger is asked.
    waiting: Option<(Connection, Slot)>,
    /// A read callback returned `Pause`: an allow outside one must continue
    /// the stream.
    read_paused: bool,
    /// Bytes towards the peer were held before the decision.
    held_upstream: bool,
}

/// What to do with the connection.
enum Outcome {
    Close(String),
    Allow,
    Wait,
}

/// What the proxy reports about the TLS session at accept. `connection.mtls`
/// false means either plaintext or a handshake still running; Envoy answers
/// `connection.subject_peer_certificate` (empty before the handshake, and
/// not cached while empty) on a TLS connection only.
fn handshake_at_accept() -> Result<Handshake, HostError> {
    if host::property_bool(prop!("connection", "mtls"))? == Some(true) {
        return Ok(Handshake::PeerCertificate);
    }
    Ok(
        if host::property_present(prop!("connection", "subject_peer_certificate"))? {
            Handshake::NoPeerCertificateYet
        } else {
            Handshake::Plaintext
        },
    )
}

/// What the proxy reports on a tick: the connection is known to be TLS.
fn handshake_now() -> Result<Handshake, HostError> {
    Ok(
        if host::property_bool(prop!("connection", "mtls"))? == Some(true) {
            Handshake::PeerCertificate
        } else {
            Handshake::NoPeerCertificateYet
        },
    )
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
            gate: Gate::Judging,
            waiting: None,
            read_paused: false,
            held_upstream: false,
        }
    }

    /// Whether the root context's ticks should look at this connection.
    pub fn awaits_handshake(&self) -> bool {
        self.gate.awaits_handshake()
    }

    /// `proxy_on_new_connection`.
    pub fn on_new_connection(&mut self) -> Action {
        let Some(hold_chain) = self
            .policy
            .as_ref()
            .map(|p| p.upstream_connect() == UpstreamConnect::AfterDecision)
        else {
            return self.step(Step::Judge, None);
        };
        let action = match handshake_at_accept().and_then(|h| Ok((h, host::now_millis()?))) {
            Ok((handshake, now_ms)) => {
                let (gate, step) = Gate::opened(handshake, now_ms, hold_chain);
                self.gate = gate;
                self.step(step, Some(handshake == Handshake::PeerCertificate))
            }
            Err(e) => self.apply(Err(e)),
        };
        self.read_action(action)
    }

    /// `proxy_on_downstream_data`.
    pub fn on_downstream_data(&mut self) -> Action {
        let step = self.gate.downstream_data();
        let action = self.step(step, None);
        self.read_action(action)
    }

    /// `proxy_on_upstream_data`: passes once allowed, else holds.
    pub fn on_upstream_data(&mut self) -> Action {
        match self.gate.upstream_data() {
            Step::Pass => Action::Continue,
            Step::Hold | Step::Judge | Step::GiveUp => {
                self.held_upstream |= self.gate != Gate::Closed;
                Action::Pause
            }
        }
    }

    /// Notes whether a read callback left the chain stopped here (`Pause`),
    /// which a later allow must undo; the last one counts.
    fn read_action(&mut self, action: Action) -> Action {
        self.read_paused = action == Action::Pause && self.gate != Gate::Closed;
        action
    }

    /// `proxy_on_downstream_connection_close`.
    pub fn on_downstream_close(&mut self) {
        self.gate.closed();
    }

    /// A root-context tick, with this connection as the effective context.
    /// Returns whether the connection still awaits its handshake.
    pub fn on_tick(&mut self) -> bool {
        let (step, mtls) = match handshake_now().and_then(|h| Ok((h, host::now_millis()?))) {
            Ok((handshake, now_ms)) => (
                self.gate.tick(handshake, now_ms),
                handshake == Handshake::PeerCertificate,
            ),
            Err(e) => {
                self.apply(Err(e));
                return false;
            }
        };
        if step != Step::Hold && self.step(step, Some(mtls)) == Action::Continue {
            self.resume_if_paused();
        }
        self.gate.awaits_handshake()
    }

    /// The ledger answered (or the callout failed / timed out).
    pub fn on_http_call_response(&mut self, body_size: usize) {
        if self.waiting.is_none() {
            return;
        }
        let outcome = self.resume(body_size);
        if self.apply(outcome) == Action::Continue {
            self.resume_if_paused();
        }
    }

    /// After an allow outside a read callback: continue the stream if a read
    /// callback paused it, and say so if bytes towards the peer were held.
    fn resume_if_paused(&mut self) {
        if std::mem::take(&mut self.read_paused) {
            resume();
        }
        if self.held_upstream {
            log(
                LogLevel::Warn,
                "meshward: upstream bytes came before the decision and wait for the upstream's \
                 next ones (server-first protocols need upstreamConnect afterDecision)",
            );
        }
    }

    /// Carries out a gate step; `mtls` is `connection.mtls` when just read.
    fn step(&mut self, step: Step, mtls: Option<bool>) -> Action {
        match step {
            Step::Pass => Action::Continue,
            Step::Hold => Action::Pause,
            Step::Judge => {
                let wants_digest = self.wants_digest();
                let conn = match mtls {
                    Some(known) => Connection::read_mtls_known(known, wants_digest),
                    None => Connection::read(wants_digest),
                };
                let outcome = conn.and_then(|c| self.evaluate(c));
                self.apply(outcome)
            }
            Step::GiveUp => self.apply(Err(HostError(
                "no client certificate and no data within 10 s of accept".into(),
            ))),
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
                self.gate.judged(Judgement::Allow);
                return Action::Continue;
            }
            Ok(Outcome::Wait) => {
                self.gate.judged(Judgement::AwaitLedger);
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
        self.gate.judged(Judgement::Close);
        close();
        Action::Pause
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
}

/// `proxy_close_stream(Downstream)` on the current (or effective) context.
pub fn close() {
    if let Err(status) = hostcalls::close_downstream() {
        log(
            LogLevel::Error,
            &format!("meshward: close_downstream failed: {status:?}"),
        );
    }
}

/// `proxy_continue_stream(Downstream)`: Envoy starts the filters after this
/// one (`tcp_proxy` connects upstream) once the current VM call returns.
/// If the host refuses, the connection is closed rather than left paused.
fn resume() {
    if let Err(status) = hostcalls::resume_downstream() {
        log(
            LogLevel::Error,
            &format!("meshward: resume_downstream failed ({status:?}), closing"),
        );
        close();
    }
}
