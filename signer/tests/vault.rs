//! The signer with `ca.backend = "vault"` against a real OpenBao server,
//! through its real gRPC API (TLS, service-account token, istio-agent-like
//! client): issuance with token and AppRole auth, callers refused before
//! Vault is asked, Vault outage and recovery, token expiry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/cli.rs"]
mod cli;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/kube_api.rs"]
mod kube_api;
#[path = "support/openbao.rs"]
mod openbao;

use std::time::{Duration, Instant};

use harness::{Harness, assert_refused, id, webpki_verify};
use kube_api::KubeApi;
use meshward_signer::client::{ClientError, WorkloadKey, WorkloadKeyType};
use openbao::{AuthKind, BaoOptions, K8S_AUDIENCE, OpenBao};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;

async fn signer_on(bao: &OpenBao, auth: AuthKind, extra: &str) -> Harness {
    let vault = bao.vault_config(auth, extra);
    Harness::start_with(move |c| {
        c.ca.backend = "vault".to_string();
        c.ca.vault = Some(vault);
    })
    .await
}

fn root_der(bao: &OpenBao) -> CertificateDer<'static> {
    CertificateDer::from(pem::parse(&bao.root_pem).unwrap().into_contents())
}

fn now() -> UnixTime {
    UnixTime::now()
}

/// Issues for `default/foo` and checks the chain the workload receives.
async fn issue_and_check(h: &Harness, bao: &OpenBao) {
    let (_key, cert) = h
        .issue("default", "foo", &h.opts("default", "foo"))
        .await
        .unwrap();
    assert_eq!(
        cert.roots,
        vec![root_der(bao)],
        "the Vault root, configured in the signer"
    );
    assert_eq!(
        cert.intermediates.len(),
        1,
        "the istioca intermediate from pki_int"
    );
    webpki_verify(&cert, now());
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.leaf).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", sans.value.general_names),
        format!("[URI({:?})]", id("default", "foo").to_string())
    );
    let (_, int) = x509_parser::parse_x509_certificate(&cert.intermediates[0]).unwrap();
    assert_eq!(
        int.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "istioca"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workload_gets_a_vault_signed_chain_with_token_auth() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let h = signer_on(&bao, AuthKind::Token, "").await;
    issue_and_check(&h, &bao).await;
    assert_eq!(h.signer.issuer().name(), "vault");
}

#[tokio::test(flavor = "multi_thread")]
async fn workload_gets_a_vault_signed_chain_with_approle_auth() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let h = signer_on(&bao, AuthKind::AppRole, "").await;
    issue_and_check(&h, &bao).await;
    // RSA workload keys go through the same role (key_type=any).
    let key = WorkloadKey::generate(WorkloadKeyType::Rsa2048).unwrap();
    let cert = h
        .client
        .request_certificate(&key, &id("default", "rsa"), &h.opts("default", "rsa"))
        .await
        .unwrap();
    webpki_verify(&cert, now());
}

/// With `token` in the signer's token file and the Vault token it holds
/// revoked (logins at `auth/<mount>/`), a request is UNAVAILABLE and Vault
/// signs nothing.
async fn login_with_token_issues_nothing(h: &Harness, bao: &OpenBao, mount: &str, token: &str) {
    std::fs::write(bao.kubernetes_token_file(), token).unwrap();
    bao.revoke_login_tokens(mount).unwrap();
    let before = bao.issued_count().unwrap();
    let r = h.issue("default", "foo", &h.opts("default", "foo")).await;
    assert_refused(r, Code::Unavailable, "");
    assert_eq!(bao.issued_count().unwrap(), before, "Vault signed nothing");
}

/// In a cluster the signer logs in with its pod's projected service-account
/// token: nothing secret to hand out. The kubelet rewrites that file before
/// the token expires; a Vault token lost later (revoked, Vault restarted)
/// must be replaced by a login with the token in the file *now*.
#[tokio::test(flavor = "multi_thread")]
async fn workload_gets_a_vault_signed_chain_with_kubernetes_auth_and_the_rotated_token_is_used() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let api = KubeApi::start();
    bao.enable_kubernetes_auth(&api).unwrap();
    let first = api.mint("istio-system", "meshward-signer", K8S_AUDIENCE);
    std::fs::write(bao.kubernetes_token_file(), format!("{first}\n")).unwrap();
    let h = signer_on(&bao, AuthKind::Kubernetes, "").await;
    issue_and_check(&h, &bao).await;
    assert_eq!(api.reviewed(), vec![first.clone()], "one login at start");
    assert_eq!(api.unauthorized(), 0);

    // The kubelet writes a new token and the old one stops being valid;
    // then the Vault token the signer holds is revoked.
    let second = api.mint("istio-system", "meshward-signer", K8S_AUDIENCE);
    std::fs::write(bao.kubernetes_token_file(), &second).unwrap();
    api.invalidate(&first);
    bao.revoke_login_tokens("kubernetes").unwrap();
    issue_and_check(&h, &bao).await;
    assert_eq!(api.reviewed(), vec![first, second]);
    let m = h.metrics().await;
    assert!(m.contains("meshward_signer_vault_logins_total 2"), "{m}");
}

/// A token of another service account (say, read from a compromised
/// workload's pod) in the signer's token file gets no Vault token: the
/// role is bound to `istio-system/meshward-signer`. The signer answers
/// UNAVAILABLE, issues nothing, and recovers once its own token is back.
#[tokio::test(flavor = "multi_thread")]
async fn another_service_accounts_token_gets_no_vault_token_and_nothing_is_issued() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let api = KubeApi::start();
    bao.enable_kubernetes_auth(&api).unwrap();
    let own = api.mint("istio-system", "meshward-signer", K8S_AUDIENCE);
    std::fs::write(bao.kubernetes_token_file(), &own).unwrap();
    let h = signer_on(
        &bao,
        AuthKind::Kubernetes,
        "max_attempts = 1\nfailure_threshold = 100",
    )
    .await;
    issue_and_check(&h, &bao).await;

    for (namespace, service_account, audience) in [
        ("shop", "web", K8S_AUDIENCE),
        // The right account, but a token meant for the API server.
        (
            "istio-system",
            "meshward-signer",
            "https://kubernetes.default.svc",
        ),
    ] {
        let foreign = api.mint(namespace, service_account, audience);
        login_with_token_issues_nothing(&h, &bao, "kubernetes", &foreign).await;
    }

    std::fs::write(bao.kubernetes_token_file(), &own).unwrap();
    issue_and_check(&h, &bao).await;
}

/// With Vault's `jwt` method, Vault verifies the service-account token's
/// signature itself. A token forged with another key — same issuer name,
/// same claims — gets no Vault token, so nothing is issued.
#[tokio::test(flavor = "multi_thread")]
async fn forged_service_account_token_gets_no_vault_token_with_jwt_auth() {
    use meshward_signer::authn::keys::JwtAlgorithm;
    use meshward_signer::client::token::TokenIssuer;
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let cluster = TokenIssuer::generate(kube_api::K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
    bao.enable_jwt_auth(kube_api::K8S_ISSUER, &cluster.public_key_pem())
        .unwrap();
    let now = i64::try_from(UnixTime::now().as_secs()).unwrap();
    let token_of = |issuer: &TokenIssuer, ns: &str, sa: &str| {
        issuer
            .sign_claims(&issuer.service_account_claims(ns, sa, K8S_AUDIENCE, now, 3600))
            .unwrap()
    };
    std::fs::write(
        bao.kubernetes_token_file(),
        token_of(&cluster, "istio-system", "meshward-signer"),
    )
    .unwrap();
    let h = signer_on(
        &bao,
        AuthKind::Jwt,
        "max_attempts = 1\nfailure_threshold = 100",
    )
    .await;
    issue_and_check(&h, &bao).await;

    let forger = TokenIssuer::generate(kube_api::K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
    for token in [
        token_of(&forger, "istio-system", "meshward-signer"),
        token_of(&cluster, "shop", "web"),
    ] {
        login_with_token_issues_nothing(&h, &bao, "jwt", &token).await;
    }
    std::fs::write(
        bao.kubernetes_token_file(),
        token_of(&cluster, "istio-system", "meshward-signer"),
    )
    .unwrap();
    issue_and_check(&h, &bao).await;
    let m = h.metrics().await;
    assert!(m.contains("meshward_signer_vault_logins_total 2"), "{m}");
}

/// Waits until the published trust bundle holds exactly `want`.
async fn wait_for_bundle(h: &Harness, want: &[CertificateDer<'static>]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.signer.bundle().current().roots() != want {
        assert!(
            Instant::now() < deadline,
            "the trust bundle never followed roots_file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Vault root rotation: the operator puts old and new roots in
/// `roots_file`, later the new one alone. Each step is taken without a
/// restart and reaches the trust bundle (the ConfigMaps, bundle endpoints
/// and WatchBundle streams); a broken file is refused, once, and the
/// current roots stay.
#[tokio::test(flavor = "multi_thread")]
async fn new_vault_roots_are_taken_without_a_restart_and_reach_the_trust_bundle() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let h = signer_on(&bao, AuthKind::Token, "roots_reload_interval = \"100ms\"").await;
    issue_and_check(&h, &bao).await;
    let roots_file = bao.dir.path().join("vault-roots.pem");
    let next = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "cluster.local root 2");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.self_signed(&key).unwrap()
    };
    let both = vec![root_der(&bao), next.der().clone()];

    std::fs::write(&roots_file, format!("{}{}", bao.root_pem, next.pem())).unwrap();
    wait_for_bundle(&h, &both).await;
    let (_key, cert) = h
        .issue("default", "foo", &h.opts("default", "foo"))
        .await
        .unwrap();
    assert_eq!(cert.roots, both, "workloads get both roots");
    webpki_verify(&cert, now());

    std::fs::write(&roots_file, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h
        .metrics()
        .await
        .contains("meshward_signer_vault_roots_reload_failures_total 1")
    {
        assert!(
            Instant::now() < deadline,
            "the broken roots were never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = h.metrics().await;
    assert!(
        m.contains("meshward_signer_vault_roots_reload_failures_total 1"),
        "counted once: {m}"
    );
    assert_eq!(h.signer.bundle().current().roots(), both.as_slice());
    let (_key, cert) = h
        .issue("default", "foo", &h.opts("default", "foo"))
        .await
        .unwrap();
    assert_eq!(cert.roots, both);

    std::fs::write(&roots_file, &bao.root_pem).unwrap();
    wait_for_bundle(&h, &[root_der(&bao)]).await;
    issue_and_check(&h, &bao).await;
    let m = h.metrics().await;
    assert!(
        m.contains("meshward_signer_vault_roots_reloads_total 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_for_another_identity_is_refused_before_vault_is_asked() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let h = signer_on(&bao, AuthKind::Token, "").await;
    let before = bao.issued_count().unwrap();
    // Caller proves default/foo but asks for kube-system/admin.
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let csr = key.csr_pem(&id("kube-system", "admin")).unwrap();
    let r = h.send_csr(&csr, "default", "foo").await;
    assert!(
        matches!(&r, Err(ClientError::Status(s)) if s.code() != Code::Ok),
        "{r:?}"
    );
    // No token at all.
    let csr = key.csr_pem(&id("default", "foo")).unwrap();
    let r = h.client.create_certificate(&csr, &Default::default()).await;
    assert_refused(r, Code::Unauthenticated, "");
    assert_eq!(bao.issued_count().unwrap(), before, "Vault signed nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_down_answers_unavailable_within_the_timeout_and_recovers() {
    let Some(mut bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let configured = Duration::from_secs(4);
    let h = signer_on(
        &bao,
        AuthKind::AppRole,
        "attempt_timeout = \"1s\"\ntimeout = \"4s\"\nmax_attempts = 3\n\
         backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n\
         failure_threshold = 2\nopen_for = \"1s\"",
    )
    .await;
    issue_and_check(&h, &bao).await;

    bao.stop();
    for _ in 0..3 {
        let r = tokio::time::timeout(
            configured + Duration::from_secs(5),
            h.issue("default", "foo", &h.opts("default", "foo")),
        )
        .await
        .expect("the signer must answer within the configured Vault timeout");
        assert_refused(r, Code::Unavailable, "");
    }
    let m = h.metrics().await;
    assert!(m.contains("meshward_signer_vault_circuit_open 1"), "{m}");
    assert!(
        m.contains("meshward_signer_vault_signings_total{outcome=\"unavailable\"} 3"),
        "{m}"
    );

    // Same address, same root; the AppRole token the signer held is gone
    // with the in-memory storage, so recovery also means logging in again.
    bao.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match h.issue("default", "foo", &h.opts("default", "foo")).await {
            Ok(_) => break,
            Err(ClientError::Status(s)) if s.code() == Code::Unavailable => {
                assert!(Instant::now() < deadline, "no recovery: {}", s.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery after restart: {e:?}"),
        }
    }
    issue_and_check(&h, &bao).await;
    let m = h.metrics().await;
    assert!(m.contains("meshward_signer_vault_circuit_open 0"), "{m}");
    assert!(m.contains("meshward_signer_vault_logins_total 2"), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_vault_token_leads_to_a_new_approle_login() {
    let Some(bao) = OpenBao::start(BaoOptions {
        approle_token_ttl: Some("3s".into()),
        ..BaoOptions::default()
    }) else {
        return;
    };
    let h = signer_on(&bao, AuthKind::AppRole, "").await;
    issue_and_check(&h, &bao).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while bao.approle_token_count().unwrap() != 0 {
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    issue_and_check(&h, &bao).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_outside_the_vault_role_is_permission_denied() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    // The role only allows one namespace; the signer's own checks pass.
    bao.write_role(&["allowed_uri_sans=spiffe://cluster.local/ns/default/*"])
        .unwrap();
    let h = signer_on(&bao, AuthKind::Token, "").await;
    issue_and_check(&h, &bao).await;
    let r = h.issue("other", "foo", &h.opts("other", "foo")).await;
    assert_refused(r, Code::PermissionDenied, "");
}

/// The fenced blocks of `lang` in docs/vault.md, in order.
fn doc_blocks(lang: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vault.md")).unwrap();
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = doc.as_str();
    while let Some(at) = rest.find(&fence) {
        let body = &rest[at + fence.len()..];
        let len = body.find("```").unwrap();
        out.push(body[..len].to_string());
        rest = &body[len + 3..];
    }
    out
}

/// The first fenced block of `lang` in docs/vault.md.
fn doc_block(lang: &str) -> String {
    doc_blocks(lang).swap_remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn documented_vault_setup_and_signer_config_issue_certificates() {
    let Some(bao) = OpenBao::start(BaoOptions {
        bare: true,
        ..BaoOptions::default()
    }) else {
        return;
    };
    // The commands exactly as documented, against this server.
    let work = tempfile::tempdir().unwrap();
    let script = doc_block("sh").replace("export BAO_ADDR=https://vault.example:8200", "");
    bao.run_script(&script, work.path()).unwrap();
    let read = |f: &str| std::fs::read_to_string(work.path().join(f)).unwrap();

    // The documented signer config parses and validates as a whole...
    let documented =
        meshward_signer::config::Config::from_toml(&doc_block("toml"), "docs/vault.md").unwrap();
    documented.validate().unwrap();
    // ...and, pointed at this server and these files, issues.
    let auth = meshward_signer::issuer::vault::VaultAuthConfig::Approle {
        mount: "approle".into(),
        role_id: read("role-id").trim().to_string(),
        secret_id_file: work.path().join("secret-id"),
    };
    let cert = issue_with_documented_config(&bao, work.path(), auth).await;
    let root = CertificateDer::from(pem::parse(read("root-cert.pem")).unwrap().into_contents());
    assert_eq!(cert.roots, vec![root]);
    webpki_verify(&cert, now());
}

/// A certificate for `default/foo` from a signer on docs/vault.md's
/// `[ca.vault]`, pointed at `bao` and at the files the documented commands
/// wrote in `work`, logging in with `auth`.
async fn issue_with_documented_config(
    bao: &OpenBao,
    work: &std::path::Path,
    auth: meshward_signer::issuer::vault::VaultAuthConfig,
) -> meshward_signer::client::IssuedCertificate {
    let mut vault = meshward_signer::config::Config::from_toml(&doc_block("toml"), "docs")
        .unwrap()
        .ca
        .vault
        .unwrap();
    vault.address = bao.addr.clone();
    vault.ca_file = None;
    vault.roots_file = work.join("root-cert.pem");
    vault.auth = auth;
    let h = Harness::start_with(move |c| {
        c.ca.backend = "vault".to_string();
        c.ca.vault = Some(vault);
    })
    .await;
    let (_key, cert) = h
        .issue("default", "foo", &h.opts("default", "foo"))
        .await
        .unwrap();
    webpki_verify(&cert, now());
    cert
}

/// docs/vault.md's Kubernetes auth commands, run as written after the main
/// setup, let a signer log in with a projected service-account token.
#[tokio::test(flavor = "multi_thread")]
async fn documented_kubernetes_auth_setup_logs_the_signer_in_with_its_service_account_token() {
    let Some(bao) = OpenBao::start(BaoOptions {
        bare: true,
        ..BaoOptions::default()
    }) else {
        return;
    };
    let api = KubeApi::start();
    let work = tempfile::tempdir().unwrap();
    // Stand-ins for the API server's CA (unused: the stand-in speaks plain
    // HTTP) and the reviewer token the documented kubectl commands make.
    std::fs::write(work.path().join("k8s-ca.pem"), &bao.root_pem).unwrap();
    std::fs::write(work.path().join("reviewer-token"), &api.reviewer_token).unwrap();
    let blocks = doc_blocks("sh");
    assert_eq!(
        blocks.len(),
        2,
        "the setup and the Kubernetes auth commands"
    );
    let setup = blocks[0].replace("export BAO_ADDR=https://vault.example:8200", "");
    bao.run_script(&setup, work.path()).unwrap();
    bao.run_script(
        &format!("KUBERNETES_HOST={}\n{}", api.url, blocks[1]),
        work.path(),
    )
    .unwrap();

    let token = api.mint("istio-system", "meshward-signer", "vault");
    std::fs::write(work.path().join("token"), &token).unwrap();
    let auth = meshward_signer::issuer::vault::VaultAuthConfig::Kubernetes {
        mount: "kubernetes".into(),
        role: "meshward-signer".into(),
        token_file: work.path().join("token"),
    };
    let cert = issue_with_documented_config(&bao, work.path(), auth).await;
    webpki_verify(&cert, now());
    assert_eq!(api.reviewed(), vec![token]);
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_vault_answers_unavailable_within_the_timeout_and_recovers() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let configured = Duration::from_secs(3);
    let h = signer_on(
        &bao,
        AuthKind::Token,
        "attempt_timeout = \"1s\"\ntimeout = \"3s\"\nmax_attempts = 2\n\
         backoff_initial = \"50ms\"\nbackoff_max = \"100ms\"\n\
         failure_threshold = 2\nopen_for = \"1s\"",
    )
    .await;
    issue_and_check(&h, &bao).await;

    // Vault accepts connections but never answers.
    bao.freeze();
    for _ in 0..2 {
        let r = tokio::time::timeout(
            configured + Duration::from_secs(5),
            h.issue("default", "foo", &h.opts("default", "foo")),
        )
        .await
        .expect("the signer must answer within the configured Vault timeout");
        assert_refused(r, Code::Unavailable, "");
    }
    bao.thaw();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match h.issue("default", "foo", &h.opts("default", "foo")).await {
            Ok(_) => break,
            Err(ClientError::Status(s)) if s.code() == Code::Unavailable => {
                assert!(Instant::now() < deadline, "no recovery: {}", s.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery after thaw: {e:?}"),
        }
    }
    issue_and_check(&h, &bao).await;
}

/// `ca status` with the vault backend tells an operator what a replica's
/// configuration trusts and how it reaches Vault, without calling Vault;
/// a `roots_file` the signer would refuse fails the command.
#[test]
fn ca_status_shows_the_vault_path_login_and_roots_without_calling_vault() {
    let dir = tempfile::tempdir().unwrap();
    let root = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "vault root");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap()
    };
    let roots = dir.path().join("root-cert.pem");
    std::fs::write(&roots, root.pem()).unwrap();
    let config = dir.path().join("signer.toml");
    std::fs::write(
        &config,
        format!(
            "[ca]\nbackend = \"vault\"\n[ca.vault]\naddress = \"http://127.0.0.1:9\"\n\
             role = \"istio\"\nroots_file = {:?}\n[ca.vault.auth]\nmethod = \"kubernetes\"\n\
             role = \"meshward-signer\"\n",
            roots.display().to_string()
        ),
    )
    .unwrap();
    let status = || cli::signer_cli(&["ca", "--config", config.to_str().unwrap(), "status"]);
    let (ok, out) = status();
    assert!(ok, "{out}");
    for line in [
        "Vault http://127.0.0.1:9: signs with pki_int/sign/istio".to_string(),
        "logs in with Kubernetes auth at auth/kubernetes, role meshward-signer, token from \
         /var/run/secrets/kubernetes.io/serviceaccount/token"
            .to_string(),
        format!(
            "sha256 {}",
            meshward_signer::ledger::CertDigest::of(root.der())
        ),
    ] {
        assert!(out.contains(&line), "{line:?} not in:\n{out}");
    }
    assert!(out.contains("trusted root: CN=vault root"), "{out}");

    std::fs::write(&roots, "not a certificate").unwrap();
    let (ok, out) = status();
    assert!(!ok, "{out}");
    assert!(out.contains("roots_file"), "{out}");
}

/// `meshward-signer ca check-vault` before a rollout: it logs in with the
/// configured credentials and checks that the PKI mount's issuing CA chains
/// to `roots_file`, signing nothing; wrong credentials or roots that would
/// make the signer refuse every certificate fail it, saying why.
#[test]
fn ca_check_vault_logs_in_and_checks_the_issuing_ca_against_the_roots() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let check = |vault_toml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("signer.toml");
        std::fs::write(
            &config,
            format!(
                "[ca]\nbackend = \"vault\"\n[ca.vault]\n{}",
                vault_toml.replace("[auth]", "[ca.vault.auth]")
            ),
        )
        .unwrap();
        cli::signer_cli(&["ca", "--config", config.to_str().unwrap(), "check-vault"])
    };
    // Nothing was ever signed here: listing the mount's certificates finds
    // none (the CLI answers that listing with an error).
    let signed = || bao.issued_count().unwrap_or(0);
    let (ok, out) = check(&bao.vault_config_toml(AuthKind::AppRole, ""));
    assert!(ok, "{out}");
    assert!(out.contains("login: accepted"), "{out}");
    assert!(out.contains("issuing CA of pki_int: CN=istioca"), "{out}");
    assert!(out.contains("chains to a root of roots_file"), "{out}");
    assert_eq!(signed(), 0, "nothing signed");

    // A secret id Vault does not know.
    let wrong = bao.dir.path().join("wrong-secret-id");
    std::fs::write(&wrong, "not-the-secret-id").unwrap();
    let toml = bao.vault_config_toml(AuthKind::AppRole, "").replace(
        &bao.secret_id_file().display().to_string(),
        &wrong.display().to_string(),
    );
    let (ok, out) = check(&toml);
    assert!(!ok, "{out}");
    assert!(out.contains("login refused"), "{out}");

    // roots_file with another root: every certificate would be refused.
    let other = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "some other root");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap()
    };
    let other_file = bao.dir.path().join("other-root.pem");
    std::fs::write(&other_file, other.pem()).unwrap();
    let toml = bao.vault_config_toml(AuthKind::AppRole, "").replace(
        &bao.roots_file().display().to_string(),
        &other_file.display().to_string(),
    );
    let (ok, out) = check(&toml);
    assert!(!ok, "{out}");
    assert!(
        out.contains("not signed by any root of roots_file"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_revoke_with_the_vault_backend_revokes_in_vault_and_publishes_vaults_crl() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let vault = bao.vault_config(AuthKind::Token, "");
    let h = Harness::start_with(move |c| {
        c.ca.backend = "vault".to_string();
        c.ca.vault = Some(vault);
        c.revocation.crl_check_interval = Duration::from_millis(100);
    })
    .await;
    let (_, cert) = h
        .issue("shop", "frontend", &h.opts("shop", "frontend"))
        .await
        .unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(cert.leaf.as_ref()).unwrap();
    let serial = hex::encode(c.raw_serial())
        .trim_start_matches("00")
        .to_string();
    // The operator's `ca revoke`, with the signer's own configuration.
    let config = h.dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[ca]\nbackend = \"vault\"\ndata_dir = {:?}\n[ca.vault]\n{}",
            h.config.ca.data_dir.display().to_string(),
            bao.vault_config_toml(AuthKind::Token, "")
                .replace("[auth]", "[ca.vault.auth]")
        ),
    )
    .unwrap();
    let (ok, out) = cli::signer_cli(&[
        "ca",
        "-c",
        config.to_str().unwrap(),
        "revoke",
        "--serial",
        &serial,
        "--reason",
        "key-compromise",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("revoked at the vault backend too"), "{out}");
    // /v1/crl serves Vault's own CRL, which now lists the certificate.
    let mut listed = false;
    for _ in 0..100 {
        let (status, _) = harness::http_get(h.signer.admin_addr(), "/v1/crl.pem").await;
        if status == 200 {
            let der = reqwest::get(format!("http://{}/v1/crl", h.signer.admin_addr()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let (_, crl) = <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&der).unwrap();
            if crl
                .iter_revoked_certificates()
                .any(|r| hex::encode(r.raw_serial()).trim_start_matches("00") == serial)
            {
                listed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed, "Vault's CRL never listed serial {serial}");
    // And the ledger refuses it as a credential like any revoked one.
    let (status, body) = harness::http_get(
        h.signer.admin_addr(),
        &format!(
            "/v1/certificates/{}",
            meshward_signer::ledger::CertDigest::of(cert.leaf.as_ref())
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("key-compromise"), "{body}");
}
