//! The mesh on real Envoy 1.40 (V8): every workload's sidecar is an Envoy
//! process, certificates come from the signer over its gRPC API and reach
//! Envoy over file-based SDS, the filter is configured from the repo's own
//! WasmPlugin manifests as istiod would.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/envoy_mesh.rs"]
mod envoy_mesh;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_mesh::{BACKEND, FRONTEND, Mesh, echo};
use meshward_e2e::envoy::bootstrap::InboundApp;
use meshward_e2e::envoy::client::{self, MtlsClient};
use meshward_e2e::envoy::sidecar::SidecarSpec;
use meshward_e2e::envoy::wasmplugin::WasmPlugin;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_filter_in_envoy_allows_and_denies_per_request_with_the_reason() {
    let mesh = Mesh::start().await;
    let backend = mesh.backend(vec![mesh.http_manifest()], |_| {}).await;
    let frontend = mesh.client("shop", "frontend", &[&backend]).await;
    let reporter = mesh.client("batch", "reporter", &[&backend]).await;

    let ok = mesh.get(&frontend, "/api/orders").await;
    assert_eq!(ok.status, 200, "{ok:?}\n{}", backend.log());
    let xfcc = echo(&ok)["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(xfcc.contains(&format!("URI={FRONTEND}")), "{xfcc}");
    assert!(
        xfcc.contains("Cert=\""),
        "the manifests' EnvoyFilter turns Cert on: {xfcc}"
    );

    let post = mesh.send(&frontend, "POST", "/api/orders").await;
    assert_eq!(post.status, 403, "only GET is allowed");
    assert!(
        post.header("x-meshward-deny-reason")
            .unwrap()
            .contains("no ALLOW rule matched"),
        "{post:?}"
    );
    let admin = mesh.get(&frontend, "/admin").await;
    assert_eq!(admin.status, 403, "only /api/* is allowed");

    let denied = mesh.get(&reporter, "/api/orders").await;
    assert_eq!(denied.status, 403);
    assert!(
        denied
            .header("x-meshward-deny-reason")
            .unwrap()
            .contains("deny-batch"),
        "{denied:?}"
    );
    let _ = BACKEND;
}

fn http_policy(mode: &str) -> serde_json::Value {
    json!({
        "trustDomain": "cluster.local",
        "mode": mode,
        "rules": [
            {"name": "frontend-reads-api", "action": "ALLOW",
             "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
             "to": [{"methods": ["GET"], "paths": ["/api/*"]}]},
            {"name": "deny-reporter", "action": "DENY",
             "from": [{"principals": ["cluster.local/ns/batch/sa/reporter"]}]}
        ]
    })
}

fn network_policy() -> serde_json::Value {
    json!({
        "filterType": "network",
        "trustDomain": "cluster.local",
        "rules": [
            {"name": "shop-connects", "action": "ALLOW", "from": [{"namespaces": ["shop"]}]},
            {"name": "deny-batch", "action": "DENY", "from": [{"namespaces": ["batch"]}]}
        ]
    })
}

/// shop/postgres-like TCP workload (`app: postgres`, which the NETWORK
/// WasmPlugin selects) with the echo app behind a tcp_proxy.
async fn tcp_backend(
    mesh: &Mesh,
    config: serde_json::Value,
) -> meshward_e2e::envoy::sidecar::EnvoySidecar {
    let (app, task) = meshward_e2e::mesh::backend::spawn_echo("postgres")
        .await
        .unwrap();
    std::mem::forget(task);
    let mut spec = SidecarSpec::new("shop", "backend");
    spec.labels.insert("app".into(), "postgres".into());
    spec.inbound = Some(InboundApp::Tcp(app));
    spec.plugins = vec![mesh.network_plugin(config)];
    mesh.start_sidecar(spec).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_filter_in_envoy_closes_a_denied_connection() {
    let mesh = Mesh::start().await;
    let backend = tcp_backend(&mesh, network_policy()).await;
    let addr = backend.inbound_addr().unwrap();
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let reporter = mesh.mtls_client("batch", "reporter").await;
    let ok = frontend
        .request(addr, "GET", "/anything", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", backend.log());
    let refused = reporter.request(addr, "GET", "/anything", &[]).await;
    assert!(
        refused.is_err(),
        "the connection must be closed, got {refused:?}"
    );
    let stats = backend.admin().stats().await.unwrap();
    assert!(
        stats
            .iter()
            .any(|(k, v)| k.contains("rule=.=deny-batch;.;") && v.trim() == "1"),
        "{stats:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // the log file's flush interval
    assert!(
        backend.log().contains("meshward: close connection"),
        "{}",
        backend.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_in_envoy_reports_a_deny_without_enforcing_it() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("shadow"))], |_| {})
        .await;
    let reporter = mesh.client("batch", "reporter", &[&backend]).await;
    let r = mesh.get(&reporter, "/api/items").await;
    assert_eq!(r.status, 200, "shadow mode does not block: {r:?}");
    let reason = echo(&r)["headers"]["x-meshward-deny-reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.starts_with("shadow:") && reason.contains("deny-reporter"),
        "{reason}"
    );
    let stats = backend.admin().stats().await.unwrap();
    let shadow_deny = stats.iter().find(|(k, _)| {
        k.contains("action=.=deny;.;")
            && k.contains("rule=.=deny-reporter;.;")
            && k.contains("mode=.=shadow;.;")
    });
    assert!(
        shadow_deny.is_some_and(|(_, v)| v.trim() == "1"),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_peer_on_a_permissive_listener_is_denied_whatever_its_headers_claim() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], |s| {
            s.permissive = true
        })
        .await;
    let addr = backend.inbound_addr().unwrap();
    let r = client::http(addr, "backend.shop", "GET", "/api/items", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.header("x-meshward-deny-reason")
            .unwrap()
            .contains("requireMtls"),
        "{r:?}"
    );
    let forged = client::http(
        addr,
        "backend.shop",
        "GET",
        "/api/items",
        &[
            ("x-forwarded-client-cert", &format!("URI={FRONTEND}")),
            ("x-spiffe-id", FRONTEND),
        ],
    )
    .await
    .unwrap();
    assert_eq!(forged.status, 403, "{forged:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_listener_refuses_a_plaintext_peer_before_any_http() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], |_| {})
        .await;
    let r = client::http(
        backend.inbound_addr().unwrap(),
        "backend.shop",
        "GET",
        "/api/items",
        &[],
    )
    .await;
    assert!(r.is_err(), "STRICT mTLS must not answer plaintext: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_xfcc_and_identity_headers_do_not_change_who_the_peer_is() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], |_| {})
        .await;
    let addr = backend.inbound_addr().unwrap();
    let forged_xfcc = format!("By={BACKEND};Hash=00;URI={FRONTEND}");
    let forged: [(&str, &str); 3] = [
        ("x-forwarded-client-cert", &forged_xfcc),
        ("x-spiffe-id", FRONTEND),
        (
            "x-envoy-peer-metadata-id",
            "sidecar~10.0.0.1~frontend.shop~shop.svc.cluster.local",
        ),
    ];
    // A reporter pod dialling the backend's Envoy itself, with its own
    // certificate and headers claiming to be the frontend.
    let reporter = mesh.mtls_client("batch", "reporter").await;
    let r = reporter
        .request(addr, "GET", "/api/items", &forged)
        .await
        .unwrap();
    assert_eq!(r.status, 403, "the reporter stays the reporter: {r:?}");

    let frontend = mesh.mtls_client("shop", "frontend").await;
    let r = frontend
        .request(addr, "GET", "/api/items", &forged)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let xfcc = echo(&r)["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !xfcc.contains("Hash=00;"),
        "forged XFCC reached the app: {xfcc}"
    );
    let real_hash = meshward_e2e::attributes::sha256_hex(&frontend.identity().leaf);
    assert!(xfcc.contains(&format!("Hash={real_hash}")), "{xfcc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_cert_age_denies_a_certificate_once_it_ages_past_the_limit() {
    let mesh = Mesh::start().await;
    let policy = json!({"rules": [{"name": "fresh-frontend", "action": "ALLOW",
        "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
        "when": {"maxCertAge": "4s"}}]});
    let backend = mesh.backend(vec![mesh.http_plugin(policy)], |_| {}).await;
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let addr = backend.inbound_addr().unwrap();
    let fresh = frontend.request(addr, "GET", "/", &[]).await.unwrap();
    let age = fresh
        .client_cert
        .as_ref()
        .unwrap()
        .age(std::time::SystemTime::now());
    assert!(
        age < Duration::from_secs(4),
        "the machine was too slow to test a 4s limit: {age:?}"
    );
    assert_eq!(fresh.status, 200, "{fresh:?}");
    // The same certificate, the same policy; only its age grows.
    let not_before = fresh.client_cert.as_ref().unwrap().not_before;
    while std::time::SystemTime::now() < not_before + Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = frontend.request(addr, "GET", "/", &[]).await.unwrap();
    assert_eq!(old.status, 403, "{old:?}");
    assert!(
        old.header("x-meshward-deny-reason")
            .unwrap()
            .contains("no ALLOW rule matched"),
        "{old:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_mid_traffic_fails_no_request() {
    let mesh = Mesh::start().await;
    let short = |s: &mut SidecarSpec| {
        s.workload.cert_ttl = Duration::from_secs(6);
    };
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], short)
        .await;
    let frontend = mesh
        .client_with("shop", "frontend", &[&backend], |s| {
            short(s);
            s.upstreams[0].handshake_per_request = true;
        })
        .await;
    let first = frontend.cert().unwrap();
    let (mut sent, mut failed) = (0u32, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline && sent < 100_000 {
        if frontend.cert().unwrap().generation >= 3 && backend.cert().unwrap().generation >= 3 {
            break;
        }
        match client::http(
            frontend.outbound_addr(),
            "backend.shop",
            "GET",
            "/api/items",
            &[],
        )
        .await
        {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failed.push(format!(
                "status {} {:?}",
                r.status,
                r.header("x-meshward-deny-reason")
            )),
            Err(e) => failed.push(format!("{e:#}")),
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = frontend.cert().unwrap();
    assert!(
        last.generation >= 3,
        "frontend rotated {} times",
        last.generation - 1
    );
    assert!(backend.cert().unwrap().generation >= 3);
    assert_ne!(first.leaf, last.leaf);
    assert!(sent > 0);
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );
    // Envoy served the new certificate without a restart: the peer saw it.
    let seen = mesh.get(&frontend, "/api/items").await;
    let xfcc = echo(&seen)["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_owned();
    let now_hash = meshward_e2e::attributes::sha256_hex(&frontend.cert().unwrap().leaf);
    let first_hash = meshward_e2e::attributes::sha256_hex(&first.leaf);
    assert!(
        !xfcc.contains(&first_hash),
        "still the first certificate: {xfcc}"
    );
    let _ = now_hash;
    eprintln!(
        "rotation mid-traffic: {sent} requests, 0 failed, frontend generation {}",
        last.generation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_lookup_goes_through_an_envoy_cluster_to_the_signer() {
    let mesh = Mesh::start().await;
    let mut policy = network_policy();
    policy["ledger"] = json!({
        "cluster": meshward_e2e::envoy::bootstrap::SIGNER_CLUSTER,
        "authority": "meshward-signer.istio-system.svc",
        "timeout": "2s",
        "lookup": "always",
    });
    policy["rules"][0]["when"] = json!({"maxCertAge": "1h"});
    let backend = tcp_backend(&mesh, policy).await;
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let r = frontend
        .request(backend.inbound_addr().unwrap(), "GET", "/x", &[])
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = r.unwrap_or_else(|e| panic!("{e:#}\n{}", backend.log()));
    assert_eq!(
        r.status,
        200,
        "the ledger showed a fresh certificate: {}",
        backend.log()
    );
    let to_signer = backend
        .admin()
        .stat(&format!(
            "cluster.{}.upstream_rq_200",
            meshward_e2e::envoy::bootstrap::SIGNER_CLUSTER
        ))
        .await
        .unwrap();
    assert!(
        to_signer >= 1,
        "no lookup went through Envoy's cluster to the signer: {:?}\n{}",
        backend
            .admin()
            .stats()
            .await
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("meshward"))
            .collect::<Vec<_>>(),
        backend.log()
    );
    let stats = backend.admin().prometheus().await.unwrap();
    assert!(stats.contains("meshward_ledger_lookups_total"), "{stats}");
}

/// Starts shop/backend with `plugin` (or `wasm` instead of the filter)
/// without waiting for it to get ready; returns the sidecar once Envoy
/// exited, or panics if it is still running after 30 s.
async fn start_expecting_refusal(
    mesh: &Mesh,
    plugin: WasmPlugin,
    wasm: Option<std::path::PathBuf>,
) -> (meshward_e2e::envoy::sidecar::EnvoySidecar, Arc<AtomicU64>) {
    let (app, hits) = counting_app().await;
    let mut spec = SidecarSpec::new("shop", "backend");
    spec.inbound = Some(InboundApp::Http(app));
    spec.wait_ready = false;
    spec.plugins = vec![plugin];
    spec.wasm_override = wasm;
    let mut s = mesh.start_sidecar(spec).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.envoy().is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Envoy kept running:\n{}",
            s.log()
        );
        // Whatever it serves meanwhile must not reach the app.
        if let Ok(addr) = s
            .admin()
            .listener_addr(meshward_e2e::envoy::bootstrap::INBOUND)
            .await
        {
            let frontend = mesh.mtls_client("shop", "frontend").await;
            if let Ok(r) = frontend.request(addr, "GET", "/api/items", &[]).await {
                assert_ne!(
                    r.status, 200,
                    "served through a plugin that did not load: {r:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (s, hits)
}

/// An app that counts the requests that reach it.
async fn counting_app() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            use tokio::io::AsyncWriteExt;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plugin_config_makes_envoy_refuse_traffic_instead_of_serving_it_unfiltered() {
    let mesh = Mesh::start().await;
    for bad in [
        json!({"rules": 3}),
        json!({"mode": "permissive"}),
        json!({"rules": [{"name": "x", "action": "ALLOW", "from": [{}]}]}),
    ] {
        let (s, hits) = start_expecting_refusal(&mesh, mesh.http_plugin(bad.clone()), None).await;
        let log = s.log();
        assert!(
            log.contains("meshward: refusing pluginConfig, failing closed"),
            "{bad}: {log}"
        );
        assert!(
            log.contains("Plugin configured to fail closed failed to load"),
            "{bad}: {log}"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "{bad}: a request reached the app"
        );
    }
}

/// A proxy-wasm module whose VM refuses to start (`proxy_on_vm_start`
/// returns false).
fn failing_vm(dir: &std::path::Path) -> std::path::PathBuf {
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 0))
            (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1)))"#,
    )
    .unwrap();
    let path = dir.join("failing-vm.wasm");
    std::fs::write(&path, wasm).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_vm_that_fails_at_start_leaves_the_listener_refusing_traffic() {
    let mesh = Mesh::start().await;
    let wasm = failing_vm(mesh.dir.path());
    let (s, hits) = start_expecting_refusal(&mesh, mesh.http_manifest(), Some(wasm)).await;
    let log = s.log();
    assert!(
        log.contains("Plugin configured to fail closed failed to load"),
        "{log}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a request reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_with_a_certificate_from_another_ca_fails_the_handshake() {
    let mesh = Mesh::start().await;
    let other = Mesh::start().await;
    assert_ne!(
        mesh.signer.roots_pem().unwrap(),
        other.signer.roots_pem().unwrap()
    );
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], |_| {})
        .await;
    let addr = backend.inbound_addr().unwrap();
    // The allowed frontend's SPIFFE ID, certified by a foreign CA; it
    // trusts our CA too, so only the backend's Envoy can stop it.
    let mut ca = other.ca();
    ca.roots_pem.push_str(&mesh.signer.roots_pem().unwrap());
    let impostor = MtlsClient::issue(&ca, &mesh.workload("shop", "frontend"), Some(BACKEND))
        .await
        .unwrap();
    let r = impostor.request(addr, "GET", "/api/items", &[]).await;
    assert!(
        r.is_err(),
        "a foreign CA's certificate must fail the handshake: {r:?}"
    );
    let genuine = mesh.mtls_client("shop", "frontend").await;
    assert_eq!(
        genuine
            .request(addr, "GET", "/api/items", &[])
            .await
            .unwrap()
            .status,
        200
    );
    let failed = backend
        .admin()
        .stat_sum(&["listener.", ".ssl.fail_verify_error"])
        .await
        .unwrap()
        + backend
            .admin()
            .stat_sum(&["listener.", ".ssl.connection_error"])
            .await
            .unwrap();
    assert!(failed >= 1, "Envoy counted no refused handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_a_certificate_fails_the_handshake() {
    let mesh = Mesh::start().await;
    let backend = mesh.backend(vec![mesh.http_manifest()], |_| {}).await;
    // Verifies the backend as a mesh client would, presents nothing.
    let roots =
        Arc::new(meshward_e2e::mesh::tls::root_store(&mesh.signer.roots_pem().unwrap()).unwrap());
    let no_cert = Arc::new(meshward_e2e::mesh::tls::CurrentCert::default());
    let config =
        meshward_e2e::mesh::tls::client_config(roots, no_cert, Some(BACKEND.to_owned())).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(backend.inbound_addr().unwrap())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let outcome = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET /api/items HTTP/1.1\r\nhost: backend.shop\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    }
    .await;
    // TLS 1.3 finishes the client's side first; Envoy's alert ends it.
    let err = outcome.expect_err("answered without a client certificate");
    assert!(
        format!("{err:#}").contains("CertificateRequired"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signer_restart_keeps_issuing_from_the_same_ca() {
    let mut mesh = Mesh::start().await;
    let roots_before = mesh.signer.roots_pem().unwrap();
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], |_| {})
        .await;
    mesh.signer.restart().await.unwrap();
    assert_eq!(
        mesh.signer.roots_pem().unwrap(),
        roots_before,
        "same CA after restart"
    );
    // Issued after the restart, trusted by an Envoy that only knows the
    // bundle from before it.
    let frontend = mesh.client("shop", "frontend", &[&backend]).await;
    assert_eq!(mesh.get(&frontend, "/api/items").await.status, 200);
}

/// The app reads `x-meshward-deny-reason` (shadow mode) as the filter's
/// word; a caller's own copy must never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_deny_reason_header_never_reaches_the_app() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(vec![mesh.http_plugin(http_policy("enforce"))], |_| {})
        .await;
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let r = frontend
        .request(
            backend.inbound_addr().unwrap(),
            "GET",
            "/api/items",
            &[
                ("X-Meshward-Deny-Reason", "shadow: all good"),
                ("x-meshward-deny-reason", "allowed by admin"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let headers = echo(&r)["headers"].as_object().unwrap().clone();
    assert!(
        !headers.contains_key("x-meshward-deny-reason"),
        "{headers:?}"
    );
}

/// A server that speaks first (as MySQL, SMTP, PostgreSQL's SSL answer
/// and many others do): a greeting on accept, then an echo of each line.
async fn speak_first_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
                let (r, mut w) = tcp.into_split();
                if w.write_all(b"220 greeting\n").await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("echo {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Connects with `client`, reads the first line (with a deadline), sends
/// `ping` and reads the answer: the lines read, or the error that ended it.
async fn converse(client: &MtlsClient, addr: std::net::SocketAddr) -> Result<Vec<String>, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let run = async {
        let tls = client.connect(addr).await.map_err(|e| format!("{e:#}"))?;
        let (r, mut w) = tokio::io::split(tls);
        let mut lines = BufReader::new(r).lines();
        let mut seen = Vec::new();
        match lines.next_line().await {
            Ok(Some(l)) => seen.push(l),
            Ok(None) => return Err(format!("closed after {seen:?}")),
            Err(e) => return Err(format!("{e}")),
        }
        w.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
        match lines.next_line().await {
            Ok(Some(l)) => seen.push(l),
            Ok(None) => return Err(format!("closed after {seen:?}")),
            Err(e) => return Err(format!("{e}")),
        }
        Ok(seen)
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap_or_else(|_| Err("no answer in 10 s".into()))
}

/// shop/backend (`app: postgres`) in front of a speak-first app, the
/// NETWORK WasmPlugin with `upstreamConnect` = `connect`; `early_data`:
/// the inbound tcp_proxy's `max_early_data_bytes`.
async fn speak_first_backend(
    mesh: &Mesh,
    connect: &str,
    early_data: Option<u32>,
) -> meshward_e2e::envoy::sidecar::EnvoySidecar {
    let app = speak_first_app().await;
    let mut spec = SidecarSpec::new("shop", "backend");
    spec.labels.insert("app".into(), "postgres".into());
    spec.inbound = Some(InboundApp::Tcp(app));
    spec.tcp_early_data_bytes = early_data;
    let mut policy = network_policy();
    policy["upstreamConnect"] = json!(connect);
    spec.plugins = vec![mesh.network_plugin(policy)];
    mesh.start_sidecar(spec).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_filter_waits_for_the_handshake_when_the_upstream_speaks_first() {
    let mesh = Mesh::start().await;
    let backend = speak_first_backend(&mesh, "afterDecision", Some(65536)).await;
    let addr = backend.inbound_addr().unwrap();
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let reporter = mesh.mtls_client("batch", "reporter").await;
    for round in 0..5 {
        let allowed = converse(&frontend, addr).await;
        assert_eq!(
            allowed,
            Ok(vec!["220 greeting".to_owned(), "echo ping".to_owned()]),
            "round {round}: the frontend completed mTLS and is allowed\n{}",
            backend.log()
        );
        let denied = converse(&reporter, addr).await;
        assert!(
            denied.is_err(),
            "round {round}: the reporter must not see the greeting: {denied:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = backend.log();
    assert!(
        !log.contains("no peer identity"),
        "decided before the handshake:\n{log}"
    );
    assert!(!log.contains("panic"), "{log}");
    // afterDecision: no upstream connection for the denied reporter.
    let upstream = backend
        .admin()
        .stat("cluster.inbound|80||.upstream_cx_total")
        .await
        .unwrap();
    assert_eq!(
        upstream, 5,
        "one upstream connection per allowed connection only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_peer_never_sees_a_speak_first_greeting_with_the_default_upstream_connect() {
    let mesh = Mesh::start().await;
    let backend = speak_first_backend(&mesh, "immediate", None).await;
    let addr = backend.inbound_addr().unwrap();
    let reporter = mesh.mtls_client("batch", "reporter").await;
    // The greeting is already in Envoy (tcp_proxy connected at accept);
    // the reporter, once its handshake is over, is closed without it.
    let denied = converse(&reporter, addr).await;
    assert!(denied.is_err(), "the reporter saw the greeting: {denied:?}");
    assert!(!format!("{denied:?}").contains("greeting"), "{denied:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = backend.log();
    assert!(
        !log.contains("no peer identity"),
        "decided before the handshake:\n{log}"
    );
    assert!(log.contains("meshward: close connection"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_filter_survives_envoy_closing_a_connection_it_answered_itself() {
    let mesh = Mesh::start().await;
    let mut spec = SidecarSpec::new("shop", "backend");
    spec.labels.insert("app".into(), "postgres".into());
    spec.inbound = Some(InboundApp::DirectResponse("hello from envoy\n".into()));
    // direct_response writes at once; afterDecision starts it only for an
    // allowed peer.
    let mut policy = network_policy();
    policy["upstreamConnect"] = json!("afterDecision");
    spec.plugins = vec![mesh.network_plugin(policy)];
    let backend = mesh.start_sidecar(spec).await.unwrap();
    let addr = backend.inbound_addr().unwrap();
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let reporter = mesh.mtls_client("batch", "reporter").await;
    for i in 0..20 {
        use tokio::io::AsyncReadExt;
        let (client, allowed) = if i % 3 == 2 {
            (&reporter, false)
        } else {
            (&frontend, true)
        };
        let outcome = async {
            let mut tls = client.connect(addr).await?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await?;
            anyhow::Ok(buf)
        };
        let got = tokio::time::timeout(Duration::from_secs(10), outcome)
            .await
            .expect("no answer in 10 s");
        let text = got
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        if allowed {
            assert_eq!(
                text,
                "hello from envoy\n",
                "connection {i} (allowed): {got:?}\n{}",
                backend.log()
            );
        } else {
            assert!(text.is_empty(), "connection {i} (denied) saw {text:?}");
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = backend.log();
    assert!(!log.contains("panic"), "the VM panicked:\n{log}");
}
