//! Host behaviour against the specification, with small guests in WAT.

use std::sync::Arc;

use super::*;

const GUEST: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $getp (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_made_up_call" (func $nosuch (param i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $hget (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $cont (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_pread" (func $pread (param i32 i32 i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (data (i32.const 0) "hello")
  (data (i32.const 16) "connection\00mtls")
  (data (i32.const 64) "x-test")
  (data (i32.const 80) "callout")
  (data (i32.const 96) "ledger")
  (data (i32.const 128) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\02\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/x\00:authority\00a\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (i32.store (i32.const 1000) (call $log (i32.const 2) (i32.const 65530) (i32.const 100)))
    (i32.store (i32.const 1004) (call $nosuch (i32.const 1)))
    (i32.store (i32.const 1008) (call $log (i32.const 2) (i32.const 0) (i32.const 5)))
    (i32.store (i32.const 1012) (call $log (i32.const 9) (i32.const 0) (i32.const 5)))
    (i32.store (i32.const 1016) (call $pread (i32.const 0) (i32.const 0) (i32.const 0) (i64.const 0) (i32.const 0)))
    (drop (call $tick (i32.const 250)))
    (i32.ne (local.get 1) (i32.const 0)))
  (func (export "proxy_on_tick") (param i32)
    (i32.store (i32.const 3100) (i32.add (i32.load (i32.const 3100)) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (i32.store (i32.const 3000) (local.get $ctx))
    (i32.store (i32.const 1020) (call $hget (i32.const 0) (i32.const 64) (i32.const 6) (i32.const 2000) (i32.const 2004)))
    (i32.store (i32.const 1024) (call $getp (i32.const 16) (i32.const 15) (i32.const 2008) (i32.const 2012)))
    (i32.store (i32.const 1028) (call $getp (i32.const 16) (i32.const 15) (i32.const 70000) (i32.const 2012)))
    (i32.store (i32.const 1032) (call $hget (i32.const 0) (i32.const 64) (i32.const 70000) (i32.const 2000) (i32.const 2004)))
    (if (result i32) (i32.eq (i32.load8_u (i32.load (i32.const 2008))) (i32.const 0))
      (then
        (drop (call $reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 5)
                           (i32.const 0) (i32.const 0) (i32.const -1)))
        (i32.const 1))
      (else
        (i32.store (i32.const 1036)
          (call $call (i32.const 96) (i32.const 6) (i32.const 128) (i32.const 62) (i32.const 0) (i32.const 0)
                      (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 2020)))
        (i32.const 1))))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32) (param $nb i32) (param i32)
    (drop (call $eff (i32.load (i32.const 3000))))
    (i32.store (i32.const 1040) (call $buf (i32.const 4) (i32.const 0) (local.get $nb) (i32.const 2024) (i32.const 2028)))
    (if (i32.eq (i32.load (i32.const 2028)) (i32.const 2))
      (then (drop (call $cont (i32.const 0))))
      (else (drop (call $close (i32.const 0))))))
)
"#;

fn status_at(p: &Plugin, addr: usize) -> i32 {
    let b = p.peek_memory(addr, 4).unwrap();
    i32::from_le_bytes(b.try_into().unwrap())
}

fn guest() -> CompiledPlugin {
    CompiledPlugin::compile(&wat::parse_str(GUEST).unwrap()).unwrap()
}

fn start(env: HostEnv) -> Plugin {
    guest()
        .instantiate(PluginConfig::new(b"{}".to_vec()), env)
        .unwrap()
}

#[test]
fn out_of_bounds_guest_pointer_is_invalid_memory_access_not_a_trap() {
    let p = start(HostEnv::default());
    assert_eq!(status_at(&p, 1000), Status::InvalidMemoryAccess.code());
    assert_eq!(status_at(&p, 1008), Status::Ok.code());
    assert!(!p.has_failed());
}

#[test]
fn unknown_host_call_answers_unimplemented() {
    let p = start(HostEnv::default());
    assert_eq!(status_at(&p, 1004), Status::Unimplemented.code());
    assert_eq!(status_at(&p, 1016), abi::errno::NOSYS);
    assert!(
        p.unimplemented_imports()
            .contains(&"env.proxy_made_up_call".to_owned())
    );
}

#[test]
fn unknown_log_level_is_bad_argument() {
    let p = start(HostEnv::default());
    assert_eq!(status_at(&p, 1012), Status::BadArgument.code());
}

#[test]
fn logs_are_captured() {
    let env = HostEnv::default();
    let _p = start(env.clone());
    let lines = env.logs.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].message, "hello");
    assert_eq!(lines[0].level, LogLevel::Info);
}

#[test]
fn configure_returning_false_stops_the_plugin() {
    let err = guest()
        .instantiate(PluginConfig::new(Vec::new()), HostEnv::default())
        .unwrap_err();
    assert!(matches!(err, HostError::ConfigureRejected { .. }), "{err}");
}

#[test]
fn module_without_abi_marker_is_refused() {
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let err = Plugin::load(&wasm, "{}").unwrap_err();
    assert!(matches!(err, HostError::NotAbi("proxy_abi_version_0_2_1")));
}

#[test]
fn request_headers_properties_and_local_response() {
    let mut p = start(HostEnv::default());
    let mut props = Properties::new();
    props.set_bool("connection.mtls", false);
    let headers = vec![
        (":path".to_owned(), "/".to_owned()),
        ("X-Test".to_owned(), "v1".to_owned()),
    ];
    let (ctx, outcome) = p.new_http_request(&props, &headers, b"").unwrap();
    assert_eq!(status_at(&p, 1020), Status::Ok.code());
    let ptr = status_at(&p, 2000) as usize;
    let len = status_at(&p, 2004) as usize;
    assert_eq!(p.peek_memory(ptr, len).unwrap(), b"v1");
    assert_eq!(status_at(&p, 1024), Status::Ok.code());
    assert_eq!(status_at(&p, 2012), 1, "a bool is one byte");
    assert_eq!(status_at(&p, 1028), Status::InvalidMemoryAccess.code());
    assert_eq!(status_at(&p, 1032), Status::InvalidMemoryAccess.code());
    match outcome {
        HttpOutcome::LocalResponse(r) => {
            assert_eq!(r.status, 403);
            assert_eq!(r.body, b"hello");
        }
        other => panic!("expected a local response, got {other:?}"),
    }
    p.finish(ctx).unwrap();
    assert_eq!(p.open_contexts(), 1);
}

async fn serve_once(body: &'static str) -> std::net::SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = service_fn(
            move |_req: http::Request<hyper::body::Incoming>| async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::from(body),
                )))
            },
        );
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    addr
}

async fn callout_outcome(body: &'static str) -> HttpOutcome {
    let addr = serve_once(body).await;
    let env = HostEnv {
        upstreams: Arc::new(StaticUpstreams::new().with("ledger", addr)),
        ..HostEnv::default()
    };
    let plugin = driver::SharedPlugin::new(start(env));
    let mut props = Properties::new();
    props.set_bool("connection.mtls", true);
    let result = plugin.http_request(&props, &[], b"").await;
    let call_status = plugin.with(|p| status_at(p, 1036));
    let (ctx, outcome) =
        result.unwrap_or_else(|e| panic!("{e}; proxy_http_call status {call_status}"));
    plugin.with(|p| assert_eq!(status_at(p, 1036), Status::Ok.code()));
    plugin.with(|p| assert_eq!(status_at(p, 1040), Status::Ok.code()));
    plugin.finish(ctx).unwrap();
    outcome
}

#[tokio::test]
async fn paused_request_resumes_after_http_callout() {
    assert!(matches!(
        callout_outcome("ok").await,
        HttpOutcome::Continue { .. }
    ));
}

#[tokio::test]
async fn paused_request_is_reset_when_callout_answer_says_so() {
    assert_eq!(callout_outcome("nope").await, HttpOutcome::Reset);
}

#[test]
fn shared_data_compare_and_swap() {
    let d = SharedData::new();
    assert_eq!(d.set(b"k", b"1", 0), Status::Ok);
    let (_, cas) = d.get(b"k").unwrap();
    assert_eq!(d.set(b"k", b"2", cas), Status::Ok);
    assert_eq!(d.set(b"k", b"3", cas), Status::CasMismatch);
    assert_eq!(d.get(b"k").unwrap().0, b"2");
}

#[test]
fn tick_period_is_recorded_and_on_tick_runs() {
    let mut p = start(HostEnv::default());
    assert_eq!(p.tick_period_ms(), 250);
    p.tick().unwrap();
    p.tick().unwrap();
    assert_eq!(status_at(&p, 3100), 2);
}

const TRAPPING: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable)
)
"#;

#[test]
fn guest_trap_fails_the_plugin_closed() {
    let mut p = CompiledPlugin::compile(&wat::parse_str(TRAPPING).unwrap())
        .unwrap()
        .instantiate(PluginConfig::new(b"{}".to_vec()), HostEnv::default())
        .unwrap();
    let err = p
        .new_http_request(&Properties::new(), &[], b"")
        .unwrap_err();
    assert!(
        matches!(
            err,
            HostError::Trap {
                callback: "proxy_on_request_headers",
                ..
            }
        ),
        "{err}"
    );
    assert!(p.has_failed());
    assert!(matches!(
        p.new_http_request(&Properties::new(), &[], b"")
            .unwrap_err(),
        HostError::Failed
    ));
}
