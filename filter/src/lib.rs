//! Policy core and proxy-wasm shim (see README).
