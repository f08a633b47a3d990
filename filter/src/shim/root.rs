//! Root context: parses `pluginConfig` once per configure and hands the
//! compiled policy to every connection / request context.

use super::host::{ConnectionCache, log};
use super::http::HttpFilter;
use super::ledger::InFlight;
use super::metrics::Metrics;
use super::stream::TcpFilter;
use super::streams;
use crate::config::{ConfigError, FilterType};
use crate::policy::{PeerRulesCache, Policy};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
use std::rc::Rc;

pub struct Root {
    /// `None` until a valid config is loaded, and after an invalid one:
    /// every context created meanwhile denies.
    policy: Option<Rc<Policy>>,
    /// The `filterType` of the last config, even a refused one, so that the
    /// contexts created after a refusal have the right kind (and deny).
    filter_type: FilterType,
    metrics: Rc<Metrics>,
    /// Ledger lookups in flight in this VM, across contexts.
    in_flight: Rc<InFlight>,
    /// Connection facts shared by the requests of one connection.
    connections: Rc<ConnectionCache>,
    /// Each peer identity's rules under the current policy.
    peer_rules: Rc<PeerRulesCache>,
}

impl Root {
    pub fn new() -> Self {
        Self {
            policy: None,
            filter_type: FilterType::Http,
            metrics: Rc::new(Metrics::default()),
            in_flight: Rc::new(InFlight::default()),
            connections: Rc::new(ConnectionCache::default()),
            peer_rules: Rc::new(PeerRulesCache::default()),
        }
    }

    fn load(&mut self, size: usize) -> Result<Policy, ConfigError> {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .map_err(|s| {
                ConfigError::Json(format!("cannot read pluginConfig from the host: {s:?}"))
            })?
            .unwrap_or_default();
        let declared = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("filterType")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            });
        self.filter_type = match declared.as_deref() {
            Some("network") => FilterType::Network,
            _ => FilterType::Http,
        };
        Policy::from_json(&bytes)
    }
}

impl Context for Root {
    /// Only a callout made from a tick (a connection judged once its
    /// handshake ended) is answered here; it goes to that connection.
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        streams::tick_callout_response(token_id, body_size);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        match self.load(plugin_configuration_size) {
            Ok(policy) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "meshward: policy loaded: {} rules, mode {}, trust domain {}, {:?} filter",
                        policy.rule_count(),
                        policy.mode().as_str(),
                        policy.trust_domain(),
                        policy.filter_type()
                    ),
                );
                self.metrics.define_fixed();
                self.peer_rules.clear();
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("meshward: refusing pluginConfig, failing closed: {e}"),
                );
                self.policy = None;
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HttpFilter::new(
            self.policy.clone(),
            self.metrics.clone(),
            self.in_flight.clone(),
            self.connections.clone(),
            self.peer_rules.clone(),
        )))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        let filter = TcpFilter::new(
            self.policy.clone(),
            self.metrics.clone(),
            self.in_flight.clone(),
            self.peer_rules.clone(),
        );
        Some(Box::new(streams::register(context_id, filter)))
    }

    /// Ticks run only while a connection waits for its TLS handshake.
    fn on_tick(&mut self) {
        streams::tick();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(match self.filter_type {
            FilterType::Network => ContextType::StreamContext,
            FilterType::Http => ContextType::HttpContext,
        })
    }
}
