//! An Istio-like sidecar bootstrap, as static Envoy config.
//!
//! What istiod would push over xDS is written here once:
//!
//! - **inbound** listener `virtualInbound`: `tls_inspector`, then a filter
//!   chain for TLS (downstream mTLS: the `default` secret, client
//!   certificate required and validated against `ROOTCA`, both over SDS)
//!   and, only when PERMISSIVE, one for plaintext (`raw_buffer`), as
//!   Istio's PeerAuthentication builds them; STRICT has no plaintext
//!   chain, so a plaintext peer matches nothing and is closed. The chain's
//!   network filters are the NETWORK WasmPlugins, then either an
//!   `http_connection_manager` (the HTTP WasmPlugins by phase, then the
//!   router, to cluster `inbound|80||`; the manifests' XFCC EnvoyFilter
//!   merged in), a `tcp_proxy` to the app, or a `direct_response`;
//! - **outbound** listener `virtualOutbound` (plaintext HTTP from the app)
//!   routing by `Host` to one cluster per peer `outbound|80||<host>`, each
//!   originating mTLS with `default`, verifying the peer's chain against
//!   `ROOTCA` and its URI SAN against the peer's exact SPIFFE ID (Istio's
//!   `match_typed_subject_alt_names`); TCP peers get a listener each,
//!   `outbound_tcp|<host>`;
//! - the signer's admin port as cluster [`SIGNER_CLUSTER`], which the
//!   filter's ledger callout (`httpCall`) names;
//! - optionally Istio's bootstrap `stats_config` ([`super::istio_stats`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{Value, json};

use super::sds::{DEFAULT, ROOTCA, SdsDir};
use super::wasmplugin::inbound_hcm_patch;

/// The cluster name the filter's `ledger.cluster` uses for the signer's
/// admin port (the name istiod gives the signer's Service port 15014).
pub const SIGNER_CLUSTER: &str = "outbound|15014||meshward-signer.istio-system.svc.cluster.local";
/// The inbound listener's name.
pub const INBOUND: &str = "virtualInbound";
/// The outbound HTTP listener's name.
pub const OUTBOUND: &str = "virtualOutbound";

/// What the inbound listener ends in.
#[derive(Debug, Clone)]
pub enum InboundApp {
    /// HTTP to the app at this address.
    Http(SocketAddr),
    /// TCP to the app at this address.
    Tcp(SocketAddr),
    /// `envoy.filters.network.direct_response` with this text.
    DirectResponse(String),
}

/// A peer this sidecar sends to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Host name apps use (`backend.shop`).
    pub host: String,
    /// The peer sidecar's inbound address.
    pub addr: SocketAddr,
    /// The peer's SPIFFE ID (its certificate must carry exactly this).
    pub spiffe_id: String,
    /// TCP instead of HTTP.
    pub tcp: bool,
    /// One request per upstream connection (every request a new mTLS
    /// handshake), instead of Envoy's connection pool.
    pub handshake_per_request: bool,
}

/// Everything one sidecar's bootstrap is built from.
#[derive(Debug, Clone)]
pub struct SidecarBootstrap {
    /// Workload name (`backend`).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Workload labels.
    pub labels: BTreeMap<String, String>,
    /// The SDS directory the agent writes.
    pub sds: SdsDir,
    /// The inbound side; `None`: no inbound listener (a pure client).
    pub inbound: Option<InboundApp>,
    /// PERMISSIVE (plaintext accepted too) instead of STRICT.
    pub permissive: bool,
    /// HTTP WasmPlugin filters for inbound, already ordered.
    pub http_filters: Vec<Value>,
    /// NETWORK WasmPlugin filters for inbound, already ordered.
    pub network_filters: Vec<Value>,
    /// Peers.
    pub upstreams: Vec<Upstream>,
    /// The signer's admin address, for [`SIGNER_CLUSTER`].
    pub signer_admin: Option<SocketAddr>,
    /// A bootstrap `stats_config`.
    pub stats_config: Option<Value>,
    /// `max_early_data_bytes` of the inbound `tcp_proxy`: it then reads
    /// the client before connecting upstream, which the network filter's
    /// `upstreamConnect: afterDecision` needs (server-first protocols).
    pub tcp_early_data_bytes: Option<u32>,
}

impl SidecarBootstrap {
    /// The bootstrap JSON.
    pub fn build(&self) -> anyhow::Result<Value> {
        let mut listeners = Vec::new();
        let mut clusters = Vec::new();
        if let Some(app) = &self.inbound {
            listeners.push(self.inbound_listener(app)?);
            match app {
                InboundApp::Http(addr) | InboundApp::Tcp(addr) => {
                    clusters.push(static_cluster(
                        "inbound|80||",
                        *addr,
                        None,
                        matches!(app, InboundApp::Http(_)),
                    ));
                }
                InboundApp::DirectResponse(_) => {}
            }
        }
        listeners.push(self.outbound_listener());
        for up in &self.upstreams {
            if up.tcp {
                listeners.push(json!({
                    "name": format!("outbound_tcp|{}", up.host),
                    "address": loopback0(),
                    "filter_chains": [{"filters": [tcp_proxy(&format!("outbound|80||{}", up.host), "outbound_tcp")]}],
                }));
            }
            let mut cluster = static_cluster(
                &format!("outbound|80||{}", up.host),
                up.addr,
                Some(self.upstream_tls(up)),
                !up.tcp,
            );
            if up.handshake_per_request
                && let Some(options) = cluster
                    .pointer_mut("/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
                    .and_then(|o| o.as_object_mut())
            {
                options.insert(
                    "common_http_protocol_options".into(),
                    json!({"max_requests_per_connection": 1}),
                );
            }
            clusters.push(cluster);
        }
        if let Some(addr) = self.signer_admin {
            clusters.push(static_cluster(SIGNER_CLUSTER, addr, None, true));
        }
        let mut bootstrap = json!({
            "node": {
                "id": format!("sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local", self.name, self.namespace, self.namespace),
                "cluster": format!("{}.{}", self.name, self.namespace),
                "metadata": {"NAMESPACE": self.namespace, "LABELS": self.labels},
            },
            "admin": {"address": loopback0()},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        });
        if let (Some(stats), Some(obj)) = (&self.stats_config, bootstrap.as_object_mut()) {
            obj.insert("stats_config".into(), stats.clone());
        }
        Ok(bootstrap)
    }

    fn downstream_tls(&self) -> Value {
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [self.sds.sds_config(DEFAULT)],
                    "combined_validation_context": {
                        "default_validation_context": {},
                        "validation_context_sds_secret_config": self.sds.sds_config(ROOTCA),
                    },
                },
            },
        })
    }

    fn upstream_tls(&self, up: &Upstream) -> Value {
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("outbound_.80_._.{}.svc.cluster.local", up.host),
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "tls_certificate_sds_secret_configs": [self.sds.sds_config(DEFAULT)],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [
                                {"san_type": "URI", "matcher": {"exact": up.spiffe_id}}
                            ],
                        },
                        "validation_context_sds_secret_config": self.sds.sds_config(ROOTCA),
                    },
                },
            },
        })
    }

    fn inbound_listener(&self, app: &InboundApp) -> anyhow::Result<Value> {
        let mut filters = self.network_filters.clone();
        filters.push(match app {
            InboundApp::Http(_) => self.inbound_hcm()?,
            InboundApp::Tcp(_) => {
                let mut proxy = tcp_proxy("inbound|80||", "inbound_tcp");
                if let Some(bytes) = self.tcp_early_data_bytes
                    && let Some(tc) = proxy.get_mut("typed_config").and_then(|t| t.as_object_mut())
                {
                    tc.insert("max_early_data_bytes".into(), json!(bytes));
                }
                proxy
            }
            InboundApp::DirectResponse(text) => json!({
                "name": "envoy.filters.network.direct_response",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config",
                    "response": {"inline_string": text},
                },
            }),
        });
        let mut chains = vec![json!({
            "name": "virtualInbound-tls",
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": self.downstream_tls(),
            "filters": filters,
        })];
        if self.permissive {
            chains.push(json!({
                "name": "virtualInbound-plaintext",
                "filter_chain_match": {"transport_protocol": "raw_buffer"},
                "filters": filters,
            }));
        }
        Ok(json!({
            "name": INBOUND,
            "address": loopback0(),
            "listener_filters": [{
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
            }],
            "filter_chains": chains,
        }))
    }

    fn inbound_hcm(&self) -> anyhow::Result<Value> {
        let mut http_filters = self.http_filters.clone();
        http_filters.push(router());
        let mut hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inbound_0.0.0.0_80",
            "codec_type": "AUTO",
            "route_config": {
                "name": "inbound|http|80",
                "virtual_hosts": [{
                    "name": "inbound|http|80",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|80||", "timeout": "0s"}}],
                }],
            },
            "http_filters": http_filters,
        });
        if let Some(obj) = hcm.as_object_mut() {
            obj.extend(inbound_hcm_patch()?);
        }
        Ok(json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}))
    }

    fn outbound_listener(&self) -> Value {
        let virtual_hosts: Vec<Value> = self
            .upstreams
            .iter()
            .filter(|u| !u.tcp)
            .map(|u| {
                json!({
                    "name": format!("{}:80", u.host),
                    "domains": [u.host, format!("{}:*", u.host)],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": format!("outbound|80||{}", u.host), "timeout": "0s"}}],
                })
            })
            .collect();
        json!({
            "name": OUTBOUND,
            "address": loopback0(),
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "outbound_0.0.0.0_80",
                    "route_config": {"name": "80", "virtual_hosts": virtual_hosts},
                    "http_filters": [router()],
                },
            }]}],
        })
    }
}

fn loopback0() -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": 0}})
}

fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
}

fn tcp_proxy(cluster: &str, stat_prefix: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    })
}

fn static_cluster(name: &str, addr: SocketAddr, tls: Option<Value>, http: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()},
            }}}]}],
        },
    });
    if let Some(obj) = c.as_object_mut() {
        if let Some(tls) = tls {
            obj.insert("transport_socket".into(), tls);
        }
        if http {
            obj.insert(
                "typed_extension_protocol_options".into(),
                json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}},
                }}),
            );
        }
    }
    c
}
