//! HTTP context: one decision per request, in `on_http_request_headers`.

use super::host::{self, Connection, HostError, log};
use super::metrics::Metrics;
use crate::config::Mode;
use crate::decision::{Decision, Verdict};
use crate::peer::Peer;
use crate::policy::Policy;
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
}

impl HttpFilter {
    pub fn new(policy: Option<Rc<Policy>>, metrics: Rc<Metrics>) -> Self {
        Self { policy, metrics }
    }

    fn act(&self, decision: &Decision<'_>, mode: Mode, who: &str, what: &str) -> Action {
        let text = decision.to_string();
        if decision.blocks() {
            log(
                LogLevel::Info,
                &format!("meshward: deny {who} {what}: {text}"),
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
            log(
                LogLevel::Warn,
                &format!("meshward: shadow deny {who} {what}: {text}"),
            );
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                DENY_REASON_HEADER,
                Some(&format!("shadow: {text}")),
            );
        } else {
            log(
                LogLevel::Debug,
                &format!("meshward: allow {who} {what}: {text} ({})", mode.as_str()),
            );
        }
        Action::Continue
    }

    fn decide(&self) -> Result<Action, HostError> {
        // A client must not be able to forge our header towards the upstream.
        hostcalls::remove_map_value(MapType::HttpRequestHeaders, DENY_REASON_HEADER)
            .map_err(|s| HostError(format!("remove header: {s:?}")))?;
        let Some(policy) = self.policy.as_deref() else {
            return Err(HostError("no valid pluginConfig loaded".into()));
        };
        let conn = Connection::read()?;
        let authority = host::request_header(":authority")?;
        let method = host::request_header(":method")?;
        let path = host::request_header(":path")?;
        let xfcc = host::request_header("x-forwarded-client-cert")?;
        let now = host::now()?;
        let peer = Peer::from_connection(
            conn.mtls,
            conn.uri_san.as_deref(),
            conn.peer_cert(xfcc.as_deref()),
        );
        let request = Request::http(
            authority.as_deref(),
            method.as_deref(),
            path.as_deref(),
            conn.port,
        );
        let decision = policy.authorize(&peer, &request, now);
        self.metrics.decision(&decision, policy.mode(), conn.mtls);
        let who = conn.uri_san.as_deref().unwrap_or("(no peer identity)");
        let what = format!(
            "{} {}",
            method.as_deref().unwrap_or("-"),
            path.as_deref().unwrap_or("-")
        );
        Ok(self.act(&decision, policy.mode(), who, &what))
    }
}

impl Context for HttpFilter {}

impl HttpContext for HttpFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.decide() {
            Ok(action) => action,
            Err(HostError(why)) => {
                log(
                    LogLevel::Error,
                    &format!("meshward: cannot decide, failing closed: {why}"),
                );
                let decision = Decision::internal_error(why);
                self.metrics.decision(&decision, Mode::Enforce, false);
                self.act(&decision, Mode::Enforce, "-", "-")
            }
        }
    }
}
