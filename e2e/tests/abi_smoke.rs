//! ABI smoke tests: the real `meshward_filter.wasm` on this host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use meshward_e2e::attributes::{ConnectionInfo, connection_properties};
use meshward_e2e::host::{
    CompiledPlugin, ConnOutcome, HostEnv, HostError, HttpOutcome, Plugin, PluginConfig, Properties,
};
use meshward_e2e::wasm::read_filter_wasm;

fn compiled() -> &'static CompiledPlugin {
    static C: OnceLock<CompiledPlugin> = OnceLock::new();
    C.get_or_init(|| CompiledPlugin::compile(&read_filter_wasm().unwrap()).unwrap())
}

fn policy(filter_type: &str) -> String {
    if filter_type == "network" {
        return serde_json::json!({
            "filterType": "network",
            "rules": [
                {"name": "frontend-connects", "action": "ALLOW",
                 "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
                 "to": [{"ports": [8080]}]},
                {"name": "no-batch", "action": "DENY", "from": [{"namespaces": ["batch"]}]}
            ]
        })
        .to_string();
    }
    serde_json::json!({
        "trustDomain": "cluster.local",
        "filterType": filter_type,
        "rules": [
            {"name": "frontend-reads-api", "action": "ALLOW",
             "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
             "to": [{"methods": ["GET"], "paths": ["/api/*"]}]},
            {"name": "no-batch", "action": "DENY",
             "from": [{"namespaces": ["batch"]}]}
        ]
    })
    .to_string()
}

fn start(config: &str) -> Result<Plugin, HostError> {
    compiled().instantiate(
        PluginConfig::new(config.as_bytes().to_vec()),
        HostEnv::default(),
    )
}

fn leaf(uri: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(10);
    params.not_after = now + time::Duration::hours(1);
    params.self_signed(&key).unwrap().der().to_vec()
}

/// The properties of a new connection from the holder of `cert`. Each gets
/// its own `connection.id`, as in Envoy (the filter keeps a connection's
/// facts by that ID).
fn props_for(cert: &[u8]) -> Properties {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    connection_properties(&ConnectionInfo {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        source: "127.0.0.1:40000".parse().unwrap(),
        destination: "127.0.0.1:8080".parse().unwrap(),
        tls_version: Some("TLSv1_3"),
        peer_cert: Some(cert),
        local_cert: None,
        expose_peer_certificate: true,
    })
}

fn get(path: &str) -> Vec<(String, String)> {
    vec![
        (":method".into(), "GET".into()),
        (":path".into(), path.into()),
        (":authority".into(), "backend.shop".into()),
        (":scheme".into(), "https".into()),
    ]
}

#[test]
fn filter_allows_frontend_get_api() {
    let mut p = start(&policy("http")).unwrap();
    let props = props_for(&leaf("spiffe://cluster.local/ns/shop/sa/frontend"));
    let (ctx, outcome) = p.new_http_request(&props, &get("/api/items"), b"").unwrap();
    assert!(
        matches!(outcome, HttpOutcome::Continue { .. }),
        "{outcome:?}"
    );
    p.finish(ctx).unwrap();
}

/// A client must not be able to make the upstream believe meshward said
/// something: its own `x-meshward-deny-reason` (any case, repeated) is
/// removed from every request the filter lets through.
#[test]
fn forged_deny_reason_header_never_reaches_the_upstream() {
    let mut p = start(&policy("http")).unwrap();
    let props = props_for(&leaf("spiffe://cluster.local/ns/shop/sa/frontend"));
    let mut headers = get("/api/items");
    headers.push(("X-Meshward-Deny-Reason".into(), "shadow: all good".into()));
    headers.push(("x-meshward-deny-reason".into(), "allowed by admin".into()));
    let (ctx, outcome) = p.new_http_request(&props, &headers, b"").unwrap();
    let HttpOutcome::Continue { headers } = outcome else {
        panic!("expected the request to go on, got {outcome:?}");
    };
    assert!(
        !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("x-meshward-deny-reason")),
        "{headers:?}"
    );
    assert!(headers.iter().any(|(k, _)| k == ":path"), "{headers:?}");
    p.finish(ctx).unwrap();
}

#[test]
fn filter_denies_batch_reporter_with_403_and_reason() {
    let mut p = start(&policy("http")).unwrap();
    let props = props_for(&leaf("spiffe://cluster.local/ns/batch/sa/reporter"));
    let (ctx, outcome) = p.new_http_request(&props, &get("/api/items"), b"").unwrap();
    match outcome {
        HttpOutcome::LocalResponse(r) => {
            assert_eq!(r.status, 403);
            let reason = r
                .headers
                .iter()
                .find(|(k, _)| k == "x-meshward-deny-reason")
                .map(|(_, v)| v.clone())
                .unwrap();
            assert!(reason.contains("no-batch"), "{reason}");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    p.finish(ctx).unwrap();
}

#[test]
fn network_filter_closes_denied_connection_and_keeps_allowed_one() {
    let mut p = start(&policy("network")).unwrap();
    let allowed = props_for(&leaf("spiffe://cluster.local/ns/shop/sa/frontend"));
    let denied = props_for(&leaf("spiffe://cluster.local/ns/batch/sa/reporter"));
    let (a, oa) = p.new_connection(&allowed).unwrap();
    let (d, od) = p.new_connection(&denied).unwrap();
    assert_eq!(oa, ConnOutcome::Continue);
    assert_eq!(od, ConnOutcome::Close);
    p.finish_connection(a).unwrap();
    p.finish_connection(d).unwrap();
}

#[test]
fn invalid_plugin_config_is_rejected_in_on_configure() {
    for bad in [
        "",
        "{not json",
        r#"{"rules": [{"name": "x", "action": "MAYBE"}]}"#,
        r#"{"unknownField": true}"#,
    ] {
        match start(bad) {
            Err(HostError::ConfigureRejected { log }) => {
                assert!(!log.is_empty(), "the plugin says why for {bad:?}");
            }
            other => panic!("config {bad:?} should be rejected, got {other:?}"),
        }
    }
}

/// The SDK links every host call; the ones this host leaves unimplemented
/// (they answer `UNIMPLEMENTED`) must be ones the filter never uses.
#[test]
fn filter_links_and_only_grpc_queue_and_ffi_calls_are_unimplemented() {
    let p = start(&policy("http")).unwrap();
    for name in p.unimplemented_imports() {
        assert!(
            name.starts_with("env.proxy_grpc_")
                || name.ends_with("_shared_queue")
                || name == "env.proxy_call_foreign_function",
            "the filter imports {name}, which this host does not implement"
        );
    }
}

#[test]
fn guest_memory_does_not_grow_across_100k_requests() {
    let mut p = start(&policy("http")).unwrap();
    let allowed = props_for(&leaf("spiffe://cluster.local/ns/shop/sa/frontend"));
    let denied = props_for(&leaf("spiffe://cluster.local/ns/batch/sa/reporter"));
    let run = |p: &mut Plugin, i: usize| {
        let props = if i.is_multiple_of(2) {
            &allowed
        } else {
            &denied
        };
        let (ctx, _) = p.new_http_request(props, &get("/api/items"), b"").unwrap();
        p.finish(ctx).unwrap();
    };
    for i in 0..2_000 {
        run(&mut p, i);
    }
    let before = p.memory_size();
    for i in 0..100_000 {
        run(&mut p, i);
    }
    assert_eq!(p.memory_size(), before, "guest memory grew");
    assert_eq!(p.open_contexts(), 1, "only the root context is left");
}

#[test]
fn request_on_a_new_connection_is_not_decided_on_a_cached_peer() {
    // The filter keeps each connection's peer facts by connection.id. A
    // request from a denied peer on its own connection must be decided on
    // its own certificate, not on the allowed peer seen just before.
    let mut p = start(&policy("http")).unwrap();
    let allowed = props_for(&leaf("spiffe://cluster.local/ns/shop/sa/frontend"));
    let denied = props_for(&leaf("spiffe://cluster.local/ns/batch/sa/reporter"));
    for _ in 0..3 {
        let (ctx, out) = p
            .new_http_request(&allowed, &get("/api/items"), b"")
            .unwrap();
        assert!(matches!(out, HttpOutcome::Continue { .. }), "{out:?}");
        p.finish(ctx).unwrap();
        let (ctx, out) = p
            .new_http_request(&denied, &get("/api/items"), b"")
            .unwrap();
        assert!(
            matches!(&out, HttpOutcome::LocalResponse(r) if r.status == 403),
            "{out:?}"
        );
        p.finish(ctx).unwrap();
    }
}
