//! The filter's policy core in the browser: the signer dashboard's policy
//! playground.
//!
//! [`evaluate`] takes a plugin config (a `WasmPlugin`'s `pluginConfig`, or
//! the whole `WasmPlugin` as `kubectl … -o yaml` or `-o json` prints it; as
//! JSON or YAML text, [`parse_config_text`]), a peer and a request, and
//! answers what the filter would decide,
//! with the same code the proxy-wasm plugin runs: [`Config::from_json`],
//! [`Policy::compile`], [`Policy::authorize`]. A config the plugin would
//! refuse is refused here with the same message.
//!
//! Built for `wasm32-unknown-unknown` (`scripts/playground`), it exports a
//! three-function C ABI the page calls without generated glue
//! (see [`abi`]); natively it is an ordinary library, which the tests use.

use meshward_filter::cert::{CertSource, CertValidity, PeerCert};
use meshward_filter::{Config, Peer, Policy, Request, UnixTime};
use serde::{Deserialize, Serialize};

/// What the page asks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Query {
    /// The plugin config (`pluginConfig`, or a whole `WasmPlugin`), parsed.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// The same as text, JSON or YAML, as pasted (instead of `config`).
    #[serde(default)]
    pub config_text: Option<String>,
    /// The connection's peer.
    pub peer: PeerQuery,
    /// The request (HTTP filter) or the connection's destination (network).
    #[serde(default)]
    pub request: RequestQuery,
    /// Unix seconds: when the decision is made (certificate ages count from
    /// here).
    pub now: i64,
}

/// The peer as the proxy would report it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerQuery {
    /// Did the peer present a client certificate.
    pub mtls: bool,
    /// Its URI SAN.
    #[serde(default)]
    pub uri_san: Option<String>,
    /// Its certificate's notBefore (Unix seconds), when known.
    #[serde(default)]
    pub not_before: Option<i64>,
    /// Its certificate's notAfter (Unix seconds), when known.
    #[serde(default)]
    pub not_after: Option<i64>,
}

/// The request attributes rules match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestQuery {
    /// `:authority`.
    #[serde(default)]
    pub host: Option<String>,
    /// `:method`.
    #[serde(default)]
    pub method: Option<String>,
    /// `:path`.
    #[serde(default)]
    pub path: Option<String>,
    /// `destination.port`.
    #[serde(default)]
    pub port: Option<u16>,
}

/// What the filter would do.
#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "status"
)]
pub enum Answer {
    /// The config compiles; the decision.
    Decided {
        /// `allow` or `deny`.
        verdict: &'static str,
        /// False in `shadow` mode: reported, not enforced.
        enforced: bool,
        /// The reason code (as in the filter's metrics and logs).
        reason: &'static str,
        /// The reason as the `x-meshward-deny-reason` header says it.
        explanation: String,
        /// The DENY or ALLOW rule that decided.
        rule: Option<String>,
        /// The first AUDIT rule that matched.
        audit: Option<String>,
        /// The certificate's age at `now`, seconds, when known.
        cert_age_secs: Option<i64>,
        /// Its remaining validity at `now`, seconds, when known.
        cert_remaining_secs: Option<i64>,
        /// `http` or `network`.
        filter_type: &'static str,
        /// Rules in the policy.
        rules: usize,
    },
    /// The plugin would refuse this config (and fail closed).
    ConfigRefused {
        /// Why, as the plugin logs it.
        error: String,
    },
    /// The query itself is malformed (a page bug, not a policy problem).
    BadQuery {
        /// Why.
        error: String,
    },
}

/// The decision for `query` (JSON), as JSON.
pub fn evaluate_json(query: &[u8]) -> String {
    let answer = match serde_json::from_slice::<Query>(query) {
        Ok(q) => evaluate(&q),
        Err(e) => Answer::BadQuery {
            error: e.to_string(),
        },
    };
    serde_json::to_string(&answer).unwrap_or_else(|e| {
        format!(r#"{{"status":"badQuery","error":"answer not serializable: {e}"}}"#)
    })
}

/// The plugin config in `config`: itself, or, for a whole `WasmPlugin`
/// resource (`kubectl get wasmplugin NAME -o json`), its
/// `spec.pluginConfig` — the plugin config has no `kind`, so the two cannot
/// be confused. A `WasmPlugin` without one is refused as the plugin would
/// refuse an empty config.
pub fn plugin_config(config: &serde_json::Value) -> Result<&serde_json::Value, String> {
    if config.get("kind").and_then(serde_json::Value::as_str) != Some("WasmPlugin") {
        return Ok(config);
    }
    config
        .pointer("/spec/pluginConfig")
        .ok_or_else(|| "this WasmPlugin has no spec.pluginConfig".to_string())
}

/// Pasted config text as the JSON the plugin would receive. JSON is read as
/// JSON; anything else as one YAML document (what `kubectl get -o yaml`
/// prints, or a `pluginConfig` copied out of a manifest), turned into JSON
/// as Istio turns a `WasmPlugin`'s YAML `pluginConfig` into the JSON text
/// the plugin gets. Several documents, or keys that are not strings, are
/// refused; so is a document whose aliases would expand without bound.
pub fn parse_config_text(text: &str) -> Result<serde_json::Value, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return serde_json::from_str(trimmed).map_err(|e| format!("not valid JSON: {e}"));
    }
    let mut docs = serde_yaml::Deserializer::from_str(text);
    let first = docs
        .next()
        .ok_or_else(|| "the config is empty".to_string())?;
    let value = <serde_json::Value as Deserialize>::deserialize(first)
        .map_err(|e| format!("not valid YAML (or JSON): {e}"))?;
    if docs.next().is_some() {
        return Err("several YAML documents: paste one WasmPlugin or one pluginConfig".to_string());
    }
    if value.is_null() {
        return Err("the config is empty".to_string());
    }
    Ok(value)
}

/// The decision for `query`.
pub fn evaluate(query: &Query) -> Answer {
    let parsed;
    let config = match (&query.config, &query.config_text) {
        (Some(c), None) => c,
        (None, Some(text)) => match parse_config_text(text) {
            Ok(v) => {
                parsed = v;
                &parsed
            }
            Err(error) => return Answer::ConfigRefused { error },
        },
        _ => {
            return Answer::BadQuery {
                error: "give exactly one of config and configText".to_string(),
            };
        }
    };
    let config = match plugin_config(config) {
        Ok(c) => c,
        Err(error) => return Answer::ConfigRefused { error },
    };
    let bytes = match serde_json::to_vec(config) {
        Ok(b) => b,
        Err(e) => {
            return Answer::BadQuery {
                error: e.to_string(),
            };
        }
    };
    let policy = match Config::from_json(&bytes).and_then(|c| Policy::compile(&c)) {
        Ok(p) => p,
        Err(e) => {
            return Answer::ConfigRefused {
                error: e.to_string(),
            };
        }
    };
    let cert = match (query.peer.not_before, query.peer.not_after) {
        (Some(nb), Some(na)) => Some(PeerCert {
            validity: CertValidity {
                not_before: UnixTime(nb),
                not_after: UnixTime(na),
            },
            source: CertSource::PeerCertificateProperty,
            revoked: None,
        }),
        _ => None,
    };
    let peer = Peer::from_connection(query.peer.mtls, query.peer.uri_san.as_deref(), cert);
    let r = &query.request;
    let request = match policy.filter_type() {
        meshward_filter::FilterType::Http => Request::http(
            r.host.as_deref(),
            r.method.as_deref(),
            r.path.as_deref(),
            r.port,
        ),
        meshward_filter::FilterType::Network => Request::tcp(r.port),
    };
    let decision = policy.authorize(&peer, &request, UnixTime(query.now));
    Answer::Decided {
        verdict: decision.verdict.as_str(),
        enforced: decision.enforced,
        reason: decision.reason.code(),
        explanation: decision.to_string(),
        rule: decision.rule.map(str::to_string),
        audit: decision.audit.map(str::to_string),
        cert_age_secs: decision.cert.map(|(t, _)| t.age_secs),
        cert_remaining_secs: decision.cert.map(|(t, _)| t.remaining_secs),
        filter_type: match policy.filter_type() {
            meshward_filter::FilterType::Http => "http",
            meshward_filter::FilterType::Network => "network",
        },
        rules: policy.rule_count(),
    }
}

/// The page's ABI, on wasm32 only: `meshward_alloc(len) -> ptr` for the
/// query, `meshward_evaluate(ptr, len) -> (ptr << 32 | len)` for the answer
/// (it frees the query), `meshward_free(ptr, len)` for the answer once read.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
pub mod abi {
    use std::alloc::{Layout, alloc, dealloc};

    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len.max(1), 1).ok()
    }

    /// A buffer of `len` bytes for the page to write into (null on failure).
    #[unsafe(no_mangle)]
    pub extern "C" fn meshward_alloc(len: usize) -> *mut u8 {
        match layout(len) {
            // SAFETY: the layout has a non-zero size.
            Some(l) => unsafe { alloc(l) },
            None => std::ptr::null_mut(),
        }
    }

    /// Frees a buffer from [`meshward_alloc`] or an answer.
    ///
    /// # Safety
    /// `ptr` / `len` must be a buffer this module handed out, not yet freed.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn meshward_free(ptr: *mut u8, len: usize) {
        if let (false, Some(l)) = (ptr.is_null(), layout(len)) {
            // SAFETY: the caller passes a live allocation of this layout.
            unsafe { dealloc(ptr, l) }
        }
    }

    /// Evaluates the query in `ptr[..len]` (freed here) and returns the
    /// answer's pointer and length packed in a u64.
    ///
    /// # Safety
    /// `ptr` / `len` must be a buffer from [`meshward_alloc`] holding the
    /// query.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn meshward_evaluate(ptr: *mut u8, len: usize) -> u64 {
        let answer = {
            // SAFETY: the caller wrote `len` bytes at `ptr`.
            let query = unsafe { std::slice::from_raw_parts(ptr, len) };
            super::evaluate_json(query)
        };
        // SAFETY: as documented, the query buffer is ours to free.
        unsafe { meshward_free(ptr, len) };
        let bytes = answer.into_bytes().into_boxed_slice();
        let len = bytes.len();
        let out = Box::into_raw(bytes).cast::<u8>();
        ((out as usize as u64) << 32) | len as u64
    }
}

#[cfg(test)]
mod tests;
