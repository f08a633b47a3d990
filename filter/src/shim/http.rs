//! HTTP context: one decision per request, in `on_http_request_headers`.

use super::host::{self, Connection, ConnectionCache, HostError, RequestHeaders, log, log_enabled};
use super::ledger::{self, InFlight, Lookup, Slot};
use super::metrics::Metrics;
use crate::cert::PeerCert;
use crate::config::Mode;
use crate::decision::{Decision, Verdict};
use crate::policy::{PeerRulesCache, Policy};
use crate::request::Request;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};
use std::rc::Rc;

/// Response / request header carrying the reason of a deny.
pub const DENY_REASON_HEADER: &str = "x-meshward-deny-reason";
const DENY_BODY: &[u8] = b"RBAC: access denied by meshward\n";

pub struct HttpFilter {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
    in_flight: Rc<InFlight>,
    connections: Rc<ConnectionCache>,
    peer_rules: Rc<PeerRulesCache>,
    /// Set while the request is paused for a ledger lookup.
    waiting: Option<(Inputs, Slot)>,
}

impl HttpFilter {
    pub fn new(
        policy: Option<Rc<Policy>>,
        metrics: Rc<Metrics>,
        in_flight: Rc<InFlight>,
        connections: Rc<ConnectionCache>,
        peer_rules: Rc<PeerRulesCache>,
    ) -> Self {
        Self {
            policy,
            metrics,
            in_flight,
            connections,
            peer_rules,
            waiting: None,
        }
    }

    /// Enforces (or, in shadow mode, reports) a decision. The texts are
    /// built only when something is sent or logged: an allowed request
    /// formats nothing unless the proxy logs at debug.
    fn act(
        &self,
        decision: &Decision<'_>,
        mode: Mode,
        who: &str,
        what: &dyn Fn() -> String,
    ) -> Action {
        if decision.blocks() {
            let text = decision.to_string();
            log(
                LogLevel::Info,
                &format!("meshward: deny {who} {}: {text}", what()),
            );
            let headers = vec![
                (DENY_REASON_HEADER, text.as_str()),
                ("content-type", "text/plain"),
            ];
            if let Err(status) = hostcalls::send_http_response(403, headers, Some(DENY_BODY)) {
                log(
                    LogLevel::Error,
                    &format!("meshward: send_http_response failed ({status:?}), resetting"),
                );
                let _ = hostcalls::reset_http_request();
            }
            return Action::Pause;
        }
        if decision.verdict == Verdict::Deny {
            // Shadow mode: report, do not enforce.
            let text = decision.to_string();
            log(
                LogLevel::Warn,
                &format!("meshward: shadow deny {who} {}: {text}", what()),
            );
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                DENY_REASON_HEADER,
                Some(&format!("shadow: {text}")),
            );
        } else if log_enabled(LogLevel::Debug) {
            log(
                LogLevel::Debug,
                &format!(
                    "meshward: allow {who} {}: {decision} ({})",
                    what(),
                    mode.as_str()
                ),
            );
        }
        Action::Continue
    }

    fn decide(&mut self) -> Result<Action, HostError> {
        let headers = RequestHeaders::read()?;
        // A client must not be able to forge our header towards the upstream.
        if headers.has_deny_reason {
            hostcalls::remove_map_value(MapType::HttpRequestHeaders, DENY_REASON_HEADER)
                .map_err(|s| HostError(format!("remove header: {s:?}")))?;
        }
        let Some(policy) = self.policy.clone() else {
            return Err(HostError("no valid pluginConfig loaded".into()));
        };
        let request = Inputs {
            conn: self.connections.current()?,
            headers,
        };
        let now = host::now()?;
        let mut cert = request.conn.peer_cert(|| request.headers.xfcc())?;
        if let Some(settings) = policy.ledger()
            && let Some(digest) = ledger::wanted(&policy, &request.conn, cert.as_ref())
        {
            match ledger::start(settings, digest, now, &self.metrics, &self.in_flight) {
                Lookup::Ready(found) => cert = found,
                Lookup::Dispatched(slot) => {
                    self.waiting = Some((request, slot));
                    return Ok(Action::Pause);
                }
            }
        }
        Ok(self.finish(&policy, &request, cert, now))
    }

    /// Decides with the peer certificate's validity known (or known to be unknown).
    fn finish(
        &self,
        policy: &Policy,
        r: &Inputs,
        cert: Option<PeerCert>,
        now: crate::UnixTime,
    ) -> Action {
        let conn = &r.conn;
        let peer = conn.peer.with_cert(cert);
        let request = Request::http(
            r.headers.authority(),
            r.headers.method(),
            r.headers.path(),
            conn.port,
        );
        let decision = match conn.rules(policy, &self.peer_rules) {
            Some(rules) => policy.authorize_with(&peer, &rules, &request, now),
            None => policy.authorize(&peer, &request, now),
        };
        self.metrics.decision(&decision, policy.mode(), conn.mtls);
        let who = conn.uri_san.as_deref().unwrap_or("(no peer identity)");
        let what = || {
            format!(
                "{} {}",
                r.headers.method().unwrap_or("-"),
                r.headers.path().unwrap_or("-")
            )
        };
        self.act(&decision, policy.mode(), who, &what)
    }

    fn fail_closed(&self, why: String) -> Action {
        log(
            LogLevel::Error,
            &format!("meshward: cannot decide, failing closed: {why}"),
        );
        let decision = Decision::internal_error(why);
        self.metrics.decision(&decision, Mode::Enforce, false);
        self.act(&decision, Mode::Enforce, "-", &|| "-".to_string())
    }

    /// The ledger answered (or the callout failed / timed out): decide now.
    fn resume(&mut self, body_size: usize) -> Result<Action, HostError> {
        let (request, slot) = self
            .waiting
            .take()
            .ok_or_else(|| HostError("ledger answer for a request not waiting for one".into()))?;
        let policy = self
            .policy
            .clone()
            .ok_or_else(|| HostError("no valid pluginConfig loaded".into()))?;
        let settings = policy
            .ledger()
            .ok_or_else(|| HostError("ledger answer without ledger config".into()))?;
        let now = host::now()?;
        let cert = ledger::finish(settings, &request.conn, body_size, now, &self.metrics);
        drop(slot);
        Ok(self.finish(&policy, &request, cert, now))
    }
}

/// What a request's decision needs, kept while the ledger is asked.
struct Inputs {
    conn: Rc<Connection>,
    headers: RequestHeaders,
}

impl Context for HttpFilter {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.waiting.is_none() {
            // Already decided: an answer nobody waits for changes nothing.
            log(
                LogLevel::Warn,
                "meshward: ledger answer for a request not waiting for one, ignored",
            );
            return;
        }
        let action = match self.resume(body_size) {
            Ok(action) => action,
            Err(HostError(why)) => self.fail_closed(why),
        };
        // A deny has sent its local reply; an allow (or a shadow deny) goes on.
        if action == Action::Continue
            && let Err(status) = hostcalls::resume_http_request()
        {
            log(
                LogLevel::Error,
                &format!("meshward: resume_http_request failed: {status:?}"),
            );
        }
    }
}

impl HttpContext for HttpFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.decide() {
            Ok(action) => action,
            Err(HostError(why)) => self.fail_closed(why),
        }
    }
}
