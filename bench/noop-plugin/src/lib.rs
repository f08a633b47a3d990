//! The floor of the Envoy authorization benchmarks (`bench/src/envoy_authz.rs`):
//! a proxy-wasm plugin that does nothing but answer `Continue`, built the
//! way the filter is (wasm32-wasip1, the workspace's `wasm` profile, the
//! same proxy-wasm SDK, `wasm-opt -O3` in `scripts/bench`). What it costs in
//! Envoy is what any Rust proxy-wasm plugin costs there: the V8 calls for
//! context creation, the callback and the context's end, and the SDK's
//! dispatch.
//!
//! One module serves both filter types, as the filter does: the plugin
//! configuration `{"filterType":"network"}` makes its root a stream
//! (network-filter) root; anything else an HTTP one. No callback reads a
//! property, a header or the clock.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
// The SDK's entry macro uses `unsafe` (it calls the WASI constructors).
#[allow(unsafe_code)]
mod entry {
    use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
    use proxy_wasm::types::{ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(Root { network: false }));
    }}

    /// The root context: which kind of contexts to create.
    struct Root {
        network: bool,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            // Read once, at configure time; no JSON parser for one word.
            self.network = self
                .get_plugin_configuration()
                .is_some_and(|c| String::from_utf8_lossy(&c).contains("\"network\""));
            true
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(if self.network {
                ContextType::StreamContext
            } else {
                ContextType::HttpContext
            })
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Pass))
        }

        fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
            Some(Box::new(Pass))
        }
    }

    /// A request's or connection's context: every callback the SDK's
    /// default, `Continue`.
    struct Pass;

    impl Context for Pass {}
    impl HttpContext for Pass {}
    impl StreamContext for Pass {}
}
