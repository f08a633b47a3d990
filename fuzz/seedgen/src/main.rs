//! Writes `fuzz/fixtures/{jwks.json,vault_root.der}` and the seed corpora
//! `fuzz/corpus/<target>/` (see `fuzz/README.md`). Deterministic where the
//! keys are (Ed25519 from fixed seeds); ECDSA signatures and the P-256 /
//! P-384 CSR keys are fresh on each run, so regenerating changes some seed
//! bytes but never what they exercise.
//!
//! Usage: `seedgen [FUZZ_DIR]` (default: the `fuzz/` this crate is in).

#[allow(dead_code)]
#[path = "../../src/der.rs"]
mod der;
#[allow(dead_code)]
#[path = "../../src/fixture.rs"]
mod fixture;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fixture::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use sha2::Digest;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const LOCAL_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const REMOTE_ISSUER: &str = "https://remote.example";

fn main() -> Result<()> {
    let fuzz: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let repo = fuzz.join("..");
    let mut out = Seeds {
        root: fuzz.join("corpus"),
    };
    jwt(&fuzz, &mut out)?;
    csr(&mut out)?;
    let certs = vault(&fuzz, &mut out)?;
    peer_cert(&certs, &mut out)?;
    xfcc(&certs, &mut out)?;
    filter_config(&repo, &mut out)?;
    wasm_property(&mut out)?;
    Ok(())
}

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        Ok(())
    }
}

fn at(t: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t).expect("a valid time")
}

fn ed25519_key(seed: &[u8; 32]) -> Result<KeyPair> {
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed)),
        &rcgen::PKCS_ED25519,
    )?)
}

// ---- jwt -------------------------------------------------------------------

fn jwt(fuzz: &Path, out: &mut Seeds) -> Result<()> {
    use ring::signature::{self as sig, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let es_pkcs8 = std::fs::read(fuzz.join("fixtures/jwt_es256.pk8.der"))?;
    let rs_pkcs8 = std::fs::read(fuzz.join("fixtures/jwt_rs256.pk8.der"))?;
    let es = sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &es_pkcs8, &rng)
        .map_err(|e| format!("ES256 fixture: {e}"))?;
    let rs = sig::RsaKeyPair::from_pkcs8(&rs_pkcs8).map_err(|e| format!("RS256 fixture: {e}"))?;
    let point = es.public_key().as_ref();
    let rsa = sig::RsaPublicKeyComponents::<Vec<u8>>::from(rs.public());
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "es", "use": "sig", "alg": "ES256",
         "x": b64(&point[1..33]), "y": b64(&point[33..65])},
        {"kty": "RSA", "kid": "rs", "use": "sig", "alg": "RS256", "n": b64(&rsa.n), "e": b64(&rsa.e)},
    ]});
    let jwks_text = serde_json::to_string_pretty(&jwks)? + "\n";
    std::fs::write(fuzz.join("fixtures/jwks.json"), &jwks_text)?;

    let k8s = |ns: &str, sa: &str| {
        serde_json::json!({"namespace": ns,
            "serviceaccount": {"name": sa, "uid": "9f0d1c2e-5b8a-4e33-9d6f-2a7c1b0e4f11"},
            "pod": {"name": format!("{sa}-6d4b9c7f5-x2x8q"), "uid": "1b2c3d4e-0000-4000-8000-00000000abcd"},
            "node": {"name": "node-1", "uid": "aa00aa00-0000-4000-8000-000000000001"}})
    };
    let full = serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": ["istio-ca"], "exp": NOW + 3600, "iat": NOW - 10,
        "nbf": NOW - 10, "sub": "system:serviceaccount:default:web",
        "kubernetes.io": k8s("default", "web")});
    let sub_only = serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": "istio-ca", "exp": NOW + 60,
        "sub": "system:serviceaccount:shop:api.v1"});
    let remote = serde_json::json!({
        "iss": REMOTE_ISSUER, "aud": ["other", "remote-ca"], "exp": NOW + 600,
        "kubernetes.io": k8s("batch", "reporter")});
    let mismatch = serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": "istio-ca", "exp": NOW + 600,
        "sub": "system:serviceaccount:kube-system:admin", "kubernetes.io": k8s("default", "web")});
    let expired = serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": "istio-ca", "exp": NOW - 61,
        "sub": "system:serviceaccount:default:web"});
    let bad_ns = serde_json::json!({
        "iss": LOCAL_ISSUER, "aud": "istio-ca", "exp": NOW + 600,
        "sub": "system:serviceaccount:DEFAULTX:default"});
    let es_header = br#"{"alg":"ES256","kid":"es","typ":"JWT"}"#;
    let signed: [(&str, &[u8], &serde_json::Value, &[u8]); 8] = [
        ("full", es_header, &full, b""),
        ("sub-only-no-kid", br#"{"alg":"ES256"}"#, &sub_only, b""),
        ("remote-cluster", es_header, &remote, b"remote"),
        ("remote-without-cluster", es_header, &remote, b""),
        ("claims-disagree", es_header, &mismatch, b""),
        ("expired", es_header, &expired, b""),
        ("non-dns1123-namespace", es_header, &bad_ns, b""),
        (
            "crit-header",
            br#"{"alg":"ES256","kid":"es","crit":["exp"]}"#,
            &full,
            b"",
        ),
    ];
    for (name, header, claims, cluster) in signed {
        let claims = serde_json::to_vec(claims)?;
        let mut parts: Vec<&[u8]> = vec![header, &claims];
        if !cluster.is_empty() {
            parts.push(cluster);
        }
        let mut seed = b"S".to_vec();
        seed.extend_from_slice(&join(&parts));
        out.put("jwt", &format!("signed-{name}"), &seed)?;
    }

    // Whole tokens, signed here with each fixture key.
    let message = |header: &[u8], claims: &serde_json::Value| -> Result<String> {
        Ok(format!(
            "{}.{}",
            b64(header),
            b64(&serde_json::to_vec(claims)?)
        ))
    };
    let m = message(es_header, &full)?;
    let s = es.sign(&rng, m.as_bytes()).map_err(|_| "ES256 signing")?;
    out.put(
        "jwt",
        "token-es256",
        format!("R{m}.{}", b64(s.as_ref())).as_bytes(),
    )?;
    let m = message(br#"{"alg":"RS256","kid":"rs","typ":"JWT"}"#, &sub_only)?;
    let mut s = vec![0; rs.public().modulus_len()];
    rs.sign(&sig::RSA_PKCS1_SHA256, &rng, m.as_bytes(), &mut s)
        .map_err(|_| "RS256 signing")?;
    out.put("jwt", "token-rs256", format!("R{m}.{}", b64(&s)).as_bytes())?;
    let m = message(br#"{"alg":"RS256","kid":"rs"}"#, &remote)?;
    rs.sign(&sig::RSA_PKCS1_SHA256, &rng, m.as_bytes(), &mut s)
        .map_err(|_| "RS256 signing")?;
    let mut seed = format!("R{m}.{}", b64(&s)).into_bytes();
    seed.extend_from_slice(SEP);
    seed.extend_from_slice(b"remote");
    out.put("jwt", "token-rs256-remote", &seed)?;
    let none = message(br#"{"alg":"none"}"#, &full)?;
    out.put("jwt", "token-alg-none", format!("R{none}.").as_bytes())?;
    let hs = message(br#"{"alg":"HS256","kid":"es"}"#, &full)?;
    out.put(
        "jwt",
        "token-hs256",
        format!("R{hs}.c2lnbmF0dXJl").as_bytes(),
    )?;

    out.put("jwt", "jwks", format!("K{jwks_text}").as_bytes())?;
    out.put(
        "jwt",
        "jwks-mixed",
        br#"K{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"EC","crv":"P-384","x":"AA","y":"AA"},{"kty":"RSA","n":"AQAB","e":"AQAB"},{"kty":"EC","crv":"P-256","use":"enc","x":"AA","y":"AA"}]}"#,
    )?;
    Ok(())
}

// ---- csr -------------------------------------------------------------------

fn csr_params(sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("an IA5 string"))
}

fn csr(out: &mut Seeds) -> Result<()> {
    let id = "spiffe://cluster.local/ns/default/sa/web";
    let keys: Vec<(&str, KeyPair)> = vec![
        (
            "p256",
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        ),
        (
            "p384",
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
        ),
        ("ed25519", ed25519_key(&[0x33; 32])?),
    ];
    for (name, key) in &keys {
        let req = csr_params(vec![uri(id)]).serialize_request(key)?;
        out.put("csr", &format!("{name}-der"), req.der())?;
        out.put("csr", &format!("{name}-pem"), req.pem()?.as_bytes())?;
    }
    let rsa_pkcs8 =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/jwt_rs256.pk8.der"))?;
    let rsa = KeyPair::from_pkcs8_der_and_sign_algo(&rsa_pkcs8.into(), &rcgen::PKCS_RSA_SHA256)?;
    let req = csr_params(vec![uri(id)]).serialize_request(&rsa)?;
    out.put("csr", "rsa2048-der", req.der())?;

    // Hostile requests, signed by the signing mode's key: `S` + the
    // request info, which the target signs again.
    let key = ed25519_key(&CSR_KEY_SEED)?;
    let mut cn = csr_params(vec![uri(id)]);
    cn.distinguished_name.push(DnType::CommonName, "web");
    let mut ca = csr_params(vec![uri(id)]);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut not_ca = csr_params(vec![uri(id)]);
    not_ca.is_ca = IsCa::ExplicitNoCa;
    not_ca.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    not_ca.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cases: Vec<(&str, CertificateParams)> = vec![
        ("valid", csr_params(vec![uri(id)])),
        ("valid-with-usages", not_ca),
        (
            "two-uri-sans",
            csr_params(vec![uri(id), uri("spiffe://cluster.local/ns/a/sa/b")]),
        ),
        (
            "dns-san",
            csr_params(vec![
                uri(id),
                SanType::DnsName("web.default.svc".try_into()?),
            ]),
        ),
        (
            "ip-san",
            csr_params(vec![uri(id), SanType::IpAddress([10, 0, 0, 1].into())]),
        ),
        (
            "email-san",
            csr_params(vec![SanType::Rfc822Name("a@example.com".try_into()?)]),
        ),
        (
            "non-canonical-uri",
            csr_params(vec![uri("spiffe://Cluster.Local/ns/default/sa/web")]),
        ),
        (
            "not-spiffe",
            csr_params(vec![uri("https://cluster.local/ns/default/sa/web")]),
        ),
        ("no-san", csr_params(vec![])),
        ("common-name", cn),
        ("ca-true", ca),
    ];
    for (name, params) in cases {
        let req = params.serialize_request(&key)?;
        let info = der::first_inner(req.der()).ok_or("CSR without request info")?;
        let mut seed = b"S".to_vec();
        seed.extend_from_slice(info);
        out.put("csr", &format!("signed-{name}"), &seed)?;
    }
    out.put(
        "csr",
        "pem-certificate-block",
        b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    )?;
    Ok(())
}

// ---- vault_response ----------------------------------------------------------

/// Certificates for the other targets' seeds: (name, DER).
type Certs = Vec<(String, Vec<u8>)>;

fn ca_params(cn: &str, serial: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = at(NOW - 365 * 86_400);
    p.not_after = at(NOW + 10 * 365 * 86_400);
    p.serial_number = Some(SerialNumber::from(vec![serial]));
    p
}

fn leaf_params(sans: Vec<SanType>, nb: i64, na: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = at(nb);
    p.not_after = at(na);
    p.serial_number = Some(SerialNumber::from(vec![0x42, 0x17]));
    p
}

fn vault(fuzz: &Path, out: &mut Seeds) -> Result<Certs> {
    let root_key = ed25519_key(&VAULT_ROOT_SEED)?;
    let root = ca_params("meshward fuzz root", 1).self_signed(&root_key)?;
    std::fs::write(fuzz.join("fixtures/vault_root.der"), root.der())?;
    let root_issuer = Issuer::new(ca_params("meshward fuzz root", 1), root_key);
    let int_key = ed25519_key(&VAULT_INTERMEDIATE_SEED)?;
    let int = ca_params("meshward fuzz intermediate", 2).signed_by(&int_key, &root_issuer)?;
    let int_issuer = Issuer::new(ca_params("meshward fuzz intermediate", 2), int_key);
    let leaf_key = ed25519_key(&VAULT_LEAF_SEED)?;
    let other_key = ed25519_key(&[0x44; 32])?;
    let id = uri(VAULT_SPIFFE_ID);
    let dns = SanType::DnsName(VAULT_DNS_NAME.try_into()?);

    let mut cn = leaf_params(vec![id.clone()], NOW - 30, NOW + 3600);
    cn.distinguished_name.push(DnType::CommonName, "foo");
    let mut ca = leaf_params(vec![id.clone()], NOW - 30, NOW + 3600);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cases: Vec<(&str, u8, CertificateParams, &KeyPair)> = vec![
        (
            "workload",
            b'W',
            leaf_params(vec![id.clone()], NOW - 30, NOW + 3600),
            &leaf_key,
        ),
        (
            "serving",
            b'V',
            leaf_params(vec![id.clone(), dns.clone()], NOW - 30, NOW + 3600),
            &leaf_key,
        ),
        (
            "extra-dns",
            b'W',
            leaf_params(vec![id.clone(), dns.clone()], NOW - 30, NOW + 3600),
            &leaf_key,
        ),
        (
            "other-spiffe-id",
            b'W',
            leaf_params(
                vec![uri("spiffe://cluster.local/ns/kube-system/sa/admin")],
                NOW - 30,
                NOW + 3600,
            ),
            &leaf_key,
        ),
        (
            "too-long",
            b'W',
            leaf_params(vec![id.clone()], NOW - 30, NOW + 48 * 3600),
            &leaf_key,
        ),
        (
            "not-yet-valid",
            b'W',
            leaf_params(vec![id.clone()], NOW + 600, NOW + 3600),
            &leaf_key,
        ),
        (
            "expired",
            b'W',
            leaf_params(vec![id.clone()], NOW - 7200, NOW - 1),
            &leaf_key,
        ),
        (
            "other-key",
            b'W',
            leaf_params(vec![id.clone()], NOW - 30, NOW + 3600),
            &other_key,
        ),
        ("subject", b'W', cn, &leaf_key),
        ("ca", b'W', ca, &leaf_key),
    ];
    let mut certs = Vec::new();
    for (name, mode, params, key) in cases {
        let leaf = params.signed_by(key, &int_issuer)?;
        let mut seed = vec![mode];
        seed.extend_from_slice(&join(&[leaf.der(), int.der()]));
        out.put("vault_response", name, &seed)?;
        // The same to-be-signed body for the signing mode.
        let tbs = der::first_inner(leaf.der()).ok_or("certificate without TBS")?;
        let mut seed = vec![mode.to_ascii_lowercase()];
        seed.extend_from_slice(&join(&[tbs, int.der()]));
        out.put("vault_response", &format!("signed-{name}"), &seed)?;
        certs.push((name.to_string(), leaf.der().to_vec()));
    }
    let leaf =
        leaf_params(vec![id.clone()], NOW - 30, NOW + 3600).signed_by(&leaf_key, &int_issuer)?;
    let mut seed = b"W".to_vec();
    seed.extend_from_slice(leaf.der());
    out.put("vault_response", "without-intermediate", &seed)?;
    let mut seed = b"W".to_vec();
    seed.extend_from_slice(&join(&[leaf.der(), int.der(), root.der()]));
    out.put("vault_response", "with-root-in-chain", &seed)?;
    certs.push(("intermediate".into(), int.der().to_vec()));
    certs.push(("root".into(), root.der().to_vec()));

    // Validities that need GeneralizedTime (from 2050) and early UTCTime.
    for (name, nb, na) in [
        ("generalized-time", 2_600_000_000, 4_000_000_000),
        ("utc-1950", -631_152_000, 0),
        ("year-9999", 253_402_300_000, 253_402_300_799),
    ] {
        let c = leaf_params(vec![uri("spiffe://cluster.local/ns/shop/sa/api")], nb, na)
            .signed_by(&leaf_key, &int_issuer)?;
        certs.push((name.to_string(), c.der().to_vec()));
    }
    Ok(certs)
}

// ---- peer_cert, xfcc ---------------------------------------------------------

fn url_encoded_pem(der: &[u8]) -> String {
    let text = pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn sha256_hex(der: &[u8]) -> String {
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn peer_cert(certs: &Certs, out: &mut Seeds) -> Result<()> {
    for (name, der) in certs {
        out.put(
            "peer_cert",
            &format!("property-{name}"),
            url_encoded_pem(der).as_bytes(),
        )?;
        let mut seed = b"D".to_vec();
        seed.extend_from_slice(der);
        out.put("peer_cert", &format!("der-{name}"), &seed)?;
    }
    for (i, u) in [
        "spiffe://cluster.local/ns/default/sa/web",
        "SPIFFE://Cluster.Local/ns/A/sa/B",
        "spiffe://td/ns/x/other/ns/y",
        "spiffe://td/a/../b",
        "spiffe://td:8080/a",
        "spiffe://td/a%2Fb",
        "spiffe://td",
        "",
    ]
    .iter()
    .enumerate()
    {
        out.put("peer_cert", &format!("uri-{i}"), format!("U{u}").as_bytes())?;
    }
    Ok(())
}

fn xfcc(certs: &Certs, out: &mut Seeds) -> Result<()> {
    let der = &certs.first().ok_or("no certificate")?.1;
    let digest = sha256_hex(der);
    let cert = url_encoded_pem(der);
    let by = "spiffe://cluster.local/ns/shop/sa/backend";
    let envoy = format!("By={by};Hash={digest};Cert=\"{cert}\";Subject=\"\";URI={VAULT_SPIFFE_ID}");
    let mut seed = envoy.clone().into_bytes();
    seed.extend_from_slice(SEP);
    seed.extend_from_slice(digest.as_bytes());
    out.put("xfcc", "envoy-cert", &seed)?;
    let two = format!("By=spiffe://td/a;Hash=00;Cert=\"{cert}\";URI=spiffe://td/forged,{envoy}");
    let mut seed = two.into_bytes();
    seed.extend_from_slice(SEP);
    seed.extend_from_slice(digest.to_uppercase().as_bytes());
    out.put("xfcc", "forged-element-first", &seed)?;
    out.put(
        "xfcc",
        "quoted",
        br#"By=spiffe://cluster.local/ns/b/sa/b;Hash=abc;Subject="CN=x, O=\"y;z\"";URI=spiffe://cluster.local/ns/a/sa/a;DNS=a.example,By=http://frontend.lyft.com;URI=spiffe://td/x"#,
    )?;
    out.put("xfcc", "bad-quote", br#"a="x\"y;b=c"#)?;
    out.put("xfcc", "empty-element", b"a=b,,c=d")?;
    Ok(())
}

// ---- filter_config -------------------------------------------------------------

fn filter_config(repo: &Path, out: &mut Seeds) -> Result<()> {
    // The README's JSON examples that are whole configs.
    let readme = std::fs::read_to_string(repo.join("filter/README.md"))?;
    let mut n = 0;
    for block in readme.split("```json").skip(1) {
        let Some(text) = block.split("```").next() else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        if value.is_object() {
            out.put(
                "filter_config",
                &format!("readme-{n}"),
                &serde_json::to_vec(&value)?,
            )?;
            n += 1;
        }
    }
    // The manifests' pluginConfigs, as istiod hands them to Envoy (JSON).
    for name in ["wasmplugin-http", "wasmplugin-network"] {
        let path = repo.join(format!("istio-manifests/wasmplugin/{name}.yaml"));
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <serde_json::Value as serde::Deserialize>::deserialize(doc)?;
            if let Some(config) = value.pointer("/spec/pluginConfig") {
                out.put("filter_config", name, &serde_json::to_vec(config)?)?;
            }
        }
    }
    let full = serde_json::json!({
        "trustDomain": "cluster.local", "mode": "shadow", "filterType": "http",
        "requireMtls": false, "unknownCertAge": "allow",
        "rules": [
            {"name": "shop-api", "action": "ALLOW",
             "from": [{"principals": ["cluster.local/ns/shop/sa/*", "spiffe://cluster.local/ns/default/sa/web"],
                       "notPrincipals": ["spiffe://cluster.local/ns/shop/sa/evil"],
                       "namespaces": ["shop", "def*", "*"], "notNamespaces": ["kube-system"],
                       "trustDomains": ["cluster.local", "*.example"]}],
             "to": [{"hosts": ["*.shop", "API.SHOP", "api.shop:8080"], "notHosts": ["admin.shop"],
                     "ports": ["8080", 443], "notPorts": [9090],
                     "methods": ["GET", "HEAD"], "notMethods": ["DELETE"],
                     "paths": ["/api/*", "/exact", "*"], "notPaths": ["*/secret"]}],
             "when": {"maxCertAge": "12h", "minRemainingValidity": "5m"}},
            {"name": "deny-batch", "action": "DENY", "from": [{"namespaces": ["batch"]}]},
            {"name": "deny-other-td", "action": "DENY", "from": [{"notPrincipals": ["*"]}]},
            {"name": "audit_all", "action": "AUDIT", "when": {"maxCertAge": "90d"}}
        ],
        "ledger": {"cluster": "outbound|15014||meshward-signer.istio-system.svc.cluster.local",
                   "authority": "meshward-signer.istio-system.svc:15014", "timeout": "200ms",
                   "cacheTtl": "5m", "negativeCacheTtl": "30s", "lookup": "always",
                   "maxConcurrentLookups": 64}
    });
    let mut seed = serde_json::to_vec(&full)?;
    seed.extend_from_slice(SEP);
    seed.extend_from_slice(
        format!(
            "spiffe://cluster.local/ns/shop/sa/api|api.shop:8080|GET|/api/x?y|8080|{},{}\n\
             -|a|POST|/|80|\n\
             spiffe://x.example/ns/shop/sa/a||||443|\n",
            NOW - 100,
            NOW + 100
        )
        .as_bytes(),
    );
    out.put("filter_config", "every-field", &seed)?;
    out.put(
        "filter_config",
        "network",
        br#"{"filterType":"network","upstreamConnect":"afterDecision","rules":[{"name":"db","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/api"]}],"to":[{"ports":[5432,"5433"]}]}]}"#,
    )?;
    out.put("filter_config", "empty-object", b"{}")?;
    out.put(
        "filter_config",
        "positional-rule",
        br#"{"rules":[["r","ALLOW"]]}"#,
    )?;
    Ok(())
}

// ---- wasm_property ---------------------------------------------------------------

fn header_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn cache_entry(kind: u8, expires: i64, validity: Option<(i64, i64)>) -> Vec<u8> {
    let mut out = vec![1, kind];
    out.extend_from_slice(&expires.to_le_bytes());
    if let Some((nb, na)) = validity {
        out.extend_from_slice(&nb.to_le_bytes());
        out.extend_from_slice(&na.to_le_bytes());
    }
    out
}

fn wasm_property(out: &mut Seeds) -> Result<()> {
    let digest = "7f83b1657ff1fc53b92dc18148a1d65dfc2d4b1fa3d677284addd200126d9069";
    let headers = header_map(&[
        (":authority", "api.svc"),
        (":path", "/api/items?page=2"),
        (":method", "GET"),
        (":scheme", "https"),
        (
            "x-forwarded-client-cert",
            "By=spiffe://cluster.local/ns/default/sa/api;Hash=00;URI=spiffe://cluster.local/ns/default/sa/web",
        ),
        ("x-meshward-deny-reason", "forged"),
        ("X-Empty", ""),
    ]);
    let body = format!(
        r#"{{"sha256":"{digest}","serial":"0a","spiffeId":"spiffe://cluster.local/ns/shop/sa/api","notBefore":{},"notAfter":{},"notBeforeRfc3339":"x","notAfterRfc3339":"y","backend":"builtin","issuedAt":{}}}"#,
        NOW - 60,
        NOW + 3600,
        NOW - 60
    );
    let issued = cache_entry(1, NOW + 300, Some((NOW - 60, NOW + 3600)));
    out.put(
        "wasm_property",
        "request",
        &join(&[&headers, body.as_bytes(), &issued]),
    )?;
    let not_issued = cache_entry(2, NOW + 30, None);
    let admin = header_map(&[
        (":path", "/admin/x"),
        (":method", "POST"),
        (":authority", "API"),
    ]);
    out.put(
        "wasm_property",
        "admin-not-issued",
        &join(&[
            &admin,
            br#"{"sha256":"","spiffeId":"","notBefore":-1,"notAfter":0}"#,
            &not_issued,
        ]),
    )?;
    out.put(
        "wasm_property",
        "empty-map",
        &join(&[&header_map(&[]), b"{}", b""]),
    )?;
    let mut non_utf8 = header_map(&[(":path", "/\u{7f}x")]);
    if let Some(b) = non_utf8.iter_mut().rev().nth(1) {
        *b = 0xff;
    }
    out.put("wasm_property", "non-utf8-path", &non_utf8)?;
    Ok(())
}
