//! The filter learns a peer certificate's validity from the signer's ledger:
//! the real `meshward_filter.wasm` on the wasmtime host, its HTTP callouts
//! performed against a real signer's admin port.
//!
//! Each policy is chosen so that the expected outcome is impossible without
//! the ledger's answer: where the ledger should make a request pass,
//! `unknownCertAge` is `deny`; where it should make one fail, `allow`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meshward_e2e::attributes::{ConnectionInfo, connection_properties, sha256_hex};
use meshward_e2e::host::driver::SharedPlugin;
use meshward_e2e::host::{
    Clock, CompiledPlugin, ConnOutcome, HostEnv, HttpOutcome, OffsetClock, PluginConfig,
    Properties, StaticUpstreams, SystemClock,
};
use meshward_e2e::mesh::ca::LocalSigner;
use meshward_e2e::wasm::read_filter_wasm;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use spiffe::SpiffeId;

const CLUSTER: &str = "outbound|15014||meshward-signer.istio-system.svc.cluster.local";
const SAN: &str = "spiffe://cluster.local/ns/shop/sa/api";
const LOOKUPS: &str = "meshward_ledger_lookups_total";

fn compiled() -> &'static CompiledPlugin {
    static C: OnceLock<CompiledPlugin> = OnceLock::new();
    C.get_or_init(|| CompiledPlugin::compile(&read_filter_wasm().unwrap()).unwrap())
}

fn policy(filter_type: &str, unknown_cert_age: &str, timeout: &str) -> String {
    serde_json::json!({
        "filterType": filter_type,
        "unknownCertAge": unknown_cert_age,
        "ledger": {
            "cluster": CLUSTER,
            "authority": "meshward-signer.istio-system.svc",
            "timeout": timeout,
            "cacheTtl": "5m",
            "negativeCacheTtl": "30s"
        },
        "rules": [
            {"name": "fresh-certs", "action": "ALLOW", "from": [{"principals": ["*"]}],
             "when": {"maxCertAge": "1h"}}
        ]
    })
    .to_string()
}

fn env(ledger: std::net::SocketAddr, clock: Arc<dyn Clock>) -> HostEnv {
    HostEnv {
        clock,
        upstreams: Arc::new(StaticUpstreams::new().with(CLUSTER, ledger)),
        ..HostEnv::default()
    }
}

fn two_hours_ahead() -> Arc<dyn Clock> {
    Arc::new(OffsetClock {
        offset: Duration::from_secs(2 * 3600),
        ahead: true,
    })
}

fn plugin(config: &str, env: HostEnv) -> SharedPlugin {
    SharedPlugin::new(
        compiled()
            .instantiate(PluginConfig::new(config.as_bytes().to_vec()), env)
            .unwrap(),
    )
}

async fn start_signer(dir: &std::path::Path) -> LocalSigner {
    LocalSigner::start(dir, Duration::from_secs(24 * 3600))
        .await
        .unwrap()
}

/// A leaf for `shop/api` issued by the signer over the Istio CA API (so it
/// is in the ledger).
async fn issued_leaf(signer: &LocalSigner) -> Vec<u8> {
    let ca = CaClient::connect(
        signer.grpc_addr().unwrap(),
        &signer.roots_pem().unwrap(),
        "localhost",
    )
    .await
    .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let opts = CallOptions {
        token: Some(signer.tokens().token_for("shop", "api", now).unwrap()),
        ..CallOptions::default()
    };
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let cert = ca
        .request_certificate(&key, &SpiffeId::new(SAN).unwrap(), &opts)
        .await
        .unwrap();
    cert.leaf.to_vec()
}

/// A leaf for the same identity that the signer never issued.
fn unknown_leaf() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(SAN.try_into().unwrap())];
    params.self_signed(&key).unwrap().der().to_vec()
}

/// What Envoy shows the filter of an mTLS peer by default: URI SAN and
/// digest, but neither `connection.peer_certificate` nor an XFCC `Cert=`.
/// Each call is a new connection with its own `connection.id`, as in Envoy.
fn props(leaf: &[u8]) -> Properties {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    connection_properties(&ConnectionInfo {
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        source: "127.0.0.1:40000".parse().unwrap(),
        destination: "127.0.0.1:8080".parse().unwrap(),
        tls_version: Some("TLSv1_3"),
        peer_cert: Some(leaf),
        local_cert: None,
        expose_peer_certificate: false,
    })
}

fn get() -> Vec<(String, String)> {
    vec![
        (":method".into(), "GET".into()),
        (":path".into(), "/api/items".into()),
        (":authority".into(), "backend.shop".into()),
        (":scheme".into(), "https".into()),
    ]
}

fn lookups(p: &SharedPlugin, result: &str) -> i64 {
    p.with(|p| {
        p.metrics()
            .value_by_name(&format!("result=.={result};.;{LOOKUPS}"))
            .unwrap_or(0)
    })
}

async fn request(p: &SharedPlugin, leaf: &[u8]) -> HttpOutcome {
    let (ctx, outcome) = p.http_request(&props(leaf), &get(), b"").await.unwrap();
    p.finish(ctx).unwrap();
    outcome
}

fn assert_denied(outcome: &HttpOutcome) {
    match outcome {
        HttpOutcome::LocalResponse(r) => {
            assert_eq!(r.status, 403);
            assert!(
                r.headers
                    .iter()
                    .any(|(k, v)| k == "x-meshward-deny-reason" && v == "no ALLOW rule matched"),
                "{r:?}"
            );
        }
        other => panic!("expected a 403, got {other:?}"),
    }
}

fn assert_allowed(outcome: &HttpOutcome) {
    assert!(
        matches!(outcome, HttpOutcome::Continue { .. }),
        "expected the request to go on, got {outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_shows_an_old_certificate_and_max_cert_age_denies_it() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    // The proxy's clock is two hours later: the certificate is 2h old there.
    let p = plugin(
        &policy("http", "allow", "2s"),
        env(signer.admin_addr().unwrap(), two_hours_ahead()),
    );
    assert_denied(&request(&p, &leaf).await);
    assert_eq!(lookups(&p, "issued"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_shows_a_fresh_certificate_and_the_second_request_is_served_from_shared_data() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let host = env(signer.admin_addr().unwrap(), Arc::new(SystemClock));
    let p = plugin(&policy("http", "deny", "2s"), host.clone());

    // First request: paused until the callout answers, then allowed.
    let (ctx, first) = p.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert_eq!(first, HttpOutcome::Paused);
    assert!(p.run_pending_calls().await.unwrap());
    assert_allowed(&p.with(|p| p.http_state(ctx).unwrap()));
    p.finish(ctx).unwrap();
    assert_eq!(lookups(&p, "issued"), 1);
    let key = format!("meshward.ledger.v1.{}", sha256_hex(&leaf));
    assert_eq!(host.shared.get(key.as_bytes()).unwrap().0.len(), 26);

    // Second request: decided at once from shared data, no callout.
    let (ctx, second) = p.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert_allowed(&second);
    assert!(p.with(|p| p.take_http_calls()).is_empty());
    p.finish(ctx).unwrap();
    assert_eq!(lookups(&p, "cache_hit"), 1);

    // Another plugin instance of the same proxy shares the cache.
    let other = plugin(&policy("http", "deny", "2s"), host.clone());
    let (ctx, third) = other.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert_allowed(&third);
    other.finish(ctx).unwrap();

    // Five minutes later (cacheTtl) the entry is stale: asked again.
    let later = HostEnv {
        clock: Arc::new(OffsetClock {
            offset: Duration::from_secs(301),
            ahead: true,
        }),
        ..host
    };
    let p = plugin(&policy("http", "deny", "2s"), later);
    let (ctx, fourth) = p.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert_eq!(fourth, HttpOutcome::Paused);
    p.finish(ctx).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_not_in_the_ledger_is_left_to_unknown_cert_age() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let stranger = unknown_leaf();
    let admin = signer.admin_addr().unwrap();

    let strict = plugin(
        &policy("http", "deny", "2s"),
        env(admin, Arc::new(SystemClock)),
    );
    assert_denied(&request(&strict, &stranger).await);
    assert_eq!(lookups(&strict, "not_issued"), 1);
    // The 404 is cached (negativeCacheTtl): no second callout.
    let (ctx, again) = strict.with(|p| p.new_http_request(&props(&stranger), &get(), b"").unwrap());
    assert_denied(&again);
    assert!(strict.with(|p| p.take_http_calls()).is_empty());
    strict.finish(ctx).unwrap();

    let lenient = plugin(
        &policy("http", "allow", "2s"),
        env(admin, Arc::new(SystemClock)),
    );
    assert_allowed(&request(&lenient, &stranger).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_down_leaves_validity_unknown_and_nothing_cached() {
    let dir = tempfile::tempdir().unwrap();
    let mut signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let admin = signer.admin_addr().unwrap();
    signer.stop().await.unwrap();

    let host = env(admin, Arc::new(SystemClock));
    let strict = plugin(&policy("http", "deny", "2s"), host.clone());
    assert_denied(&request(&strict, &leaf).await);
    assert_eq!(lookups(&strict, "unknown"), 1);
    // A failure is not an answer: the next request asks again.
    let (ctx, again) = strict.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert_eq!(again, HttpOutcome::Paused);
    strict.finish(ctx).unwrap();

    let lenient = plugin(&policy("http", "allow", "2s"), host);
    assert_allowed(&request(&lenient, &leaf).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_ledger_times_out_and_unknown_cert_age_decides() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let strict = plugin(
        &policy("http", "deny", "100ms"),
        env(addr, Arc::new(SystemClock)),
    );
    assert_denied(&request(&strict, &leaf).await);
    assert_eq!(lookups(&strict, "unknown"), 1);
    let lenient = plugin(
        &policy("http", "allow", "100ms"),
        env(addr, Arc::new(SystemClock)),
    );
    assert_allowed(&request(&lenient, &leaf).await);
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_connection_is_held_until_the_ledger_answers() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let admin = signer.admin_addr().unwrap();

    // Fresh certificate, unknown would deny: the ledger's answer lets it in.
    let fresh = plugin(
        &policy("network", "deny", "2s"),
        env(admin, Arc::new(SystemClock)),
    );
    let (ctx, outcome) = fresh.with(|p| p.new_connection(&props(&leaf)).unwrap());
    assert_eq!(outcome, ConnOutcome::Paused);
    // Data arriving meanwhile is held too.
    let (action, _) = fresh.with(|p| p.downstream_data(ctx, b"hello", false).unwrap());
    assert_eq!(action, meshward_e2e::host::Action::Pause);
    assert!(fresh.run_pending_calls().await.unwrap());
    assert_eq!(
        fresh.with(|p| p.connection_state(ctx).unwrap()),
        ConnOutcome::Continue
    );
    fresh.finish_connection(ctx).unwrap();

    // Two hours later, unknown would allow: the ledger's answer closes it.
    let old = plugin(
        &policy("network", "allow", "2s"),
        env(admin, two_hours_ahead()),
    );
    let (ctx, outcome) = old.connection(&props(&leaf)).await.unwrap();
    assert_eq!(outcome, ConnOutcome::Close);
    old.finish_connection(ctx).unwrap();
    assert_eq!(lookups(&old, "issued"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_certificate_shown_by_the_proxy_needs_no_callout() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let p = plugin(
        &policy("http", "deny", "2s"),
        env(signer.admin_addr().unwrap(), Arc::new(SystemClock)),
    );
    let mut shown = props(&leaf);
    shown.set_str(
        "connection.peer_certificate",
        meshward_e2e::attributes::url_encoded_pem(&leaf),
    );
    let (ctx, outcome) = p.with(|p| p.new_http_request(&shown, &get(), b"").unwrap());
    assert_allowed(&outcome);
    assert!(p.with(|p| p.take_http_calls()).is_empty());
    p.finish(ctx).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfcc_cert_with_the_peer_digest_needs_no_callout() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let p = plugin(
        &policy("http", "deny", "2s"),
        env(signer.admin_addr().unwrap(), Arc::new(SystemClock)),
    );
    let mut headers = get();
    headers.push((
        "x-forwarded-client-cert".into(),
        meshward_e2e::attributes::xfcc_sanitize_set(None, Some(&leaf)).unwrap(),
    ));
    let (ctx, outcome) = p.with(|p| p.new_http_request(&props(&leaf), &headers, b"").unwrap());
    assert_allowed(&outcome);
    assert!(p.with(|p| p.take_http_calls()).is_empty());
    p.finish(ctx).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_resumes_after_the_lookup_and_marks_the_deny() {
    let dir = tempfile::tempdir().unwrap();
    let mut signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let admin = signer.admin_addr().unwrap();
    signer.stop().await.unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&policy("http", "deny", "2s")).unwrap();
    config["mode"] = "shadow".into();
    let p = plugin(&config.to_string(), env(admin, Arc::new(SystemClock)));
    match request(&p, &leaf).await {
        HttpOutcome::Continue { headers } => assert!(
            headers.iter().any(|(k, v)| k == "x-meshward-deny-reason"
                && v == "shadow: no ALLOW rule matched"),
            "{headers:?}"
        ),
        other => panic!("shadow mode must let the request on, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_past_max_concurrent_lookups_are_unknown_without_a_callout() {
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(dir.path()).await;
    let leaf = issued_leaf(&signer).await;
    let stranger = unknown_leaf();
    let mut config: serde_json::Value =
        serde_json::from_str(&policy("http", "deny", "2s")).unwrap();
    config["ledger"]["maxConcurrentLookups"] = 1.into();
    let p = plugin(
        &config.to_string(),
        env(signer.admin_addr().unwrap(), Arc::new(SystemClock)),
    );
    // One lookup waits for its answer...
    let (first, outcome) = p.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert_eq!(outcome, HttpOutcome::Paused);
    // ...so the next peer is not looked up: unknown, denied at once.
    let (second, outcome) = p.with(|p| p.new_http_request(&props(&stranger), &get(), b"").unwrap());
    assert_denied(&outcome);
    assert_eq!(lookups(&p, "overloaded"), 1);
    p.finish(second).unwrap();
    // The first answer frees the slot.
    assert!(p.run_pending_calls().await.unwrap());
    assert_allowed(&p.with(|p| p.http_state(first).unwrap()));
    p.finish(first).unwrap();
    assert_eq!(lookups(&p, "not_issued"), 0);
    let (third, outcome) = p.with(|p| p.new_http_request(&props(&stranger), &get(), b"").unwrap());
    assert_eq!(outcome, HttpOutcome::Paused);
    assert!(p.run_pending_calls().await.unwrap());
    assert_denied(&p.with(|p| p.http_state(third).unwrap()));
    p.finish(third).unwrap();
    assert_eq!(lookups(&p, "not_issued"), 1);

    // A request deleted while waiting gives its slot back too.
    let (waiting, outcome) = p.with(|p| p.new_http_request(&props(&leaf), &get(), b"").unwrap());
    assert!(
        matches!(outcome, HttpOutcome::Continue { .. }),
        "cached: {outcome:?}"
    );
    p.finish(waiting).unwrap();
    let other = unknown_leaf();
    let (gone, outcome) = p.with(|p| p.new_http_request(&props(&other), &get(), b"").unwrap());
    assert_eq!(outcome, HttpOutcome::Paused);
    p.finish(gone).unwrap();
    let _ = p.with(|p| p.take_http_calls());
    let (next, outcome) = p.with(|p| {
        p.new_http_request(&props(&unknown_leaf()), &get(), b"")
            .unwrap()
    });
    assert_eq!(outcome, HttpOutcome::Paused);
    p.finish(next).unwrap();
}
