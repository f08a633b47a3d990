//! The proxy-wasm shim: reads what the host knows, asks the core, acts.
//! Only built for wasm32. Every path that cannot evaluate the policy denies.
//! The host contract it relies on is in `filter/README.md`.

#[allow(unsafe_code)]
mod abi;
mod host;
mod http;
mod ledger;
mod metrics;
mod root;
mod stream;
mod streams;

use proxy_wasm::types::LogLevel;

// The SDK's entry macro uses `unsafe` (it calls the WASI constructors).
#[allow(unsafe_code)]
mod entry {
    use super::*;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        // Replaces the SDK's hook (which unwraps the log call). With
        // `panic = "abort"` a panic still traps the VM; Envoy then fails the
        // stream closed (WasmPlugin failStrategy FAIL_CLOSE, the default).
        std::panic::set_hook(Box::new(|info| {
            host::log(LogLevel::Critical, &format!("meshward: panic, failing closed: {info}"));
        }));
        proxy_wasm::set_root_context(|_| Box::new(root::Root::new()));
    }}
}
