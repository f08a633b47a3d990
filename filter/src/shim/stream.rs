//! Network (TCP) context: one decision per connection.
//!
//! The decision is taken in `on_new_connection` when the host already reports
//! `connection.mtls`. On a TLS listener the handshake may still be running at
//! accept time (Envoy's own RBAC network filter waits for the first data for
//! this reason), so a connection that does not look like mTLS yet is decided
//! on its first downstream or upstream data instead, before any byte passes.
//! A denied connection is closed.

use super::host::{self, Connection, HostError, log};
use super::metrics::Metrics;
use crate::config::Mode;
use crate::decision::Decision;
use crate::peer::Peer;
use crate::policy::Policy;
use crate::request::Request;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, LogLevel};
use std::rc::Rc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Undecided,
    Allowed,
    Closed,
}

pub struct TcpFilter {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
    state: State,
}

impl TcpFilter {
    pub fn new(policy: Option<Rc<Policy>>, metrics: Rc<Metrics>) -> Self {
        Self {
            policy,
            metrics,
            state: State::Undecided,
        }
    }

    fn evaluate(&self, conn: &Connection) -> Result<(bool, String), HostError> {
        let Some(policy) = self.policy.as_deref() else {
            return Err(HostError("no valid pluginConfig loaded".into()));
        };
        let now = host::now()?;
        let peer = Peer::from_connection(conn.mtls, conn.uri_san.as_deref(), conn.peer_cert(None));
        let decision = policy.authorize(&peer, &Request::tcp(conn.port), now);
        self.metrics.decision(&decision, policy.mode(), conn.mtls);
        let who = conn.uri_san.as_deref().unwrap_or("(no peer identity)");
        let port = conn.port.map_or_else(|| "-".to_string(), |p| p.to_string());
        let text = format!("{who} -> port {port}: {decision}");
        if !decision.blocks() && decision.verdict == crate::Verdict::Deny {
            log(LogLevel::Warn, &format!("meshward: shadow deny {text}"));
        }
        Ok((decision.blocks(), text))
    }

    fn decide(&mut self) -> Action {
        let outcome = Connection::read().and_then(|conn| self.evaluate(&conn));
        let (close, text) = match outcome {
            Ok(result) => result,
            Err(HostError(why)) => {
                let decision = Decision::internal_error(why.clone());
                self.metrics.decision(&decision, Mode::Enforce, false);
                (true, format!("cannot decide, failing closed: {why}"))
            }
        };
        if close {
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
            return Action::Pause;
        }
        self.state = State::Allowed;
        Action::Continue
    }

    fn on_data(&mut self) -> Action {
        match self.state {
            State::Allowed => Action::Continue,
            State::Closed => Action::Pause,
            State::Undecided => self.decide(),
        }
    }
}

impl Context for TcpFilter {}

impl StreamContext for TcpFilter {
    fn on_new_connection(&mut self) -> Action {
        match host::property_bool(&["connection", "mtls"]) {
            // Handshake possibly not finished: decide on the first data.
            Ok(Some(false) | None) => Action::Continue,
            Ok(Some(true)) | Err(_) => self.decide(),
        }
    }

    fn on_downstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        self.on_data()
    }

    fn on_upstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        self.on_data()
    }
}
