;; The ABI floor: a proxy-wasm module that makes, per decision, the same host
;; calls meshward_filter.wasm makes for the bench's request or connection —
;; and nothing else. Timed in the same host and the same way as the plugin,
;; its callback is what any plugin pays to take that decision through the
;; proxy-wasm ABI here: entering the callback, each host call, and for each
;; answer the host calling back into the guest's allocator and copying it in.
;; (The guest "allocator" is a bump pointer reset per decision: no malloc.)
;;
;; HTTP, a request on a known connection (filter/src/shim/http.rs):
;;   proxy_get_header_map_pairs(request headers), proxy_get_property
;;   connection.id, proxy_get_current_time_nanoseconds, and two
;;   proxy_increment_metric (the decision's series; the peer certificate's
;;   validity unknown).
;; Network, a new mTLS connection (filter/src/shim/stream.rs, ledger off):
;;   proxy_get_property connection.mtls, destination.port,
;;   connection.peer_certificate, connection.uri_san_peer_certificate, the
;;   clock, and the same two increments.
(module
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (memory (export "memory") 2)
  ;; 16: answer pointer, 20: answer size, 24: time, 32 and 36: metric ids.
  (data (i32.const 64) "connection\00id")
  (data (i32.const 96) "connection\00mtls")
  (data (i32.const 128) "destination\00port")
  (data (i32.const 160) "connection\00peer_certificate")
  (data (i32.const 208) "connection\00uri_san_peer_certificate")
  (data (i32.const 256) "meshward_abi_floor_decisions")
  (data (i32.const 288) "meshward_abi_floor_cert_unknown")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (local.get $at) (local.get $size)))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 256) (i32.const 28) (i32.const 32)))
    (drop (call $define (i32.const 0) (i32.const 288) (i32.const 31) (i32.const 36)))
    (i32.const 1))
  (func $count
    (drop (call $inc (i32.load (i32.const 32)) (i64.const 1)))
    (drop (call $inc (i32.load (i32.const 36)) (i64.const 1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $heap (i32.const 4096))
    (drop (call $pairs (i32.const 0) (i32.const 16) (i32.const 20)))
    (drop (call $prop (i32.const 64) (i32.const 13) (i32.const 16) (i32.const 20)))
    (drop (call $now (i32.const 24)))
    (call $count)
    (i32.const 0))
  (func (export "proxy_on_new_connection") (param i32) (result i32)
    (global.set $heap (i32.const 4096))
    (drop (call $prop (i32.const 96) (i32.const 15) (i32.const 16) (i32.const 20)))
    (drop (call $prop (i32.const 128) (i32.const 16) (i32.const 16) (i32.const 20)))
    (drop (call $prop (i32.const 160) (i32.const 27) (i32.const 16) (i32.const 20)))
    (drop (call $prop (i32.const 208) (i32.const 35) (i32.const 16) (i32.const 20)))
    (drop (call $now (i32.const 24)))
    (call $count)
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
)
