//! The built-in CA: a self-signed root and an intermediate, made with rcgen on
//! first start and kept in a data directory, reused on every later start.
//!
//! Files (Istio's plugged-in layout, so the directory can later be served by
//! the `cacerts` backend unchanged, plus the root key):
//!
//! | file | content | mode |
//! | --- | --- | --- |
//! | `root-cert.pem` | self-signed root | 0644 |
//! | `root-key.pem` | root key (PKCS#8) | 0600 |
//! | `ca-cert.pem` | intermediate, signs leaves | 0644 |
//! | `ca-key.pem` | intermediate key (PKCS#8) | 0600 |
//! | `cert-chain.pem` | intermediate then root | 0644 |

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, PublicKeyData,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use super::{IssueError, IssueFuture, IssueRequest, IssuedChain, Issuer, SigningValidity};

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const CERT_CHAIN: &str = "cert-chain.pem";

/// Key algorithm of the built-in CA's own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CaKeyAlgorithm {
    /// ECDSA P-256 with SHA-256 (default).
    #[default]
    EcdsaP256,
    /// RSA-2048 with PKCS#1 v1.5 SHA-256.
    Rsa2048,
}

/// How to create the CA when the data directory is empty.
#[derive(Debug, Clone)]
pub struct BuiltinOptions {
    /// Where the CA files live.
    pub data_dir: PathBuf,
    /// Key algorithm for a newly created root and intermediate.
    pub key_algorithm: CaKeyAlgorithm,
    /// Organization written in the CA subjects (the trust domain).
    pub organization: String,
    /// Validity of a newly created root.
    pub root_ttl: Duration,
    /// Validity of a newly created intermediate (capped by the root's).
    pub intermediate_ttl: Duration,
}

/// Why the built-in CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// Filesystem problem with a named path.
    #[error("CA data {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file exists but is not what it should be.
    #[error("CA data {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Some CA files exist and others do not: refuse to guess.
    #[error(
        "CA data dir {dir} is incomplete (have {present:?}, missing {missing:?}); restore the missing files or empty the directory"
    )]
    Incomplete {
        /// The data directory.
        dir: PathBuf,
        /// Files present.
        present: Vec<&'static str>,
        /// Files missing.
        missing: Vec<&'static str>,
    },
    /// Key generation or certificate signing failed.
    #[error("creating the CA: {0}")]
    Create(String),
}

/// The built-in CA backend.
pub struct BuiltinIssuer {
    root: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    signer: rcgen::Issuer<'static, KeyPair>,
    validity: SigningValidity,
    created: bool,
}

impl std::fmt::Debug for BuiltinIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinIssuer")
            .field("validity", &self.validity)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl BuiltinIssuer {
    /// Load the CA from `opts.data_dir`, or create it there if the directory
    /// holds none of the CA files. A partially present CA is an error.
    /// `now` is the creation time for a new CA.
    pub fn load_or_create(
        opts: &BuiltinOptions,
        now: OffsetDateTime,
    ) -> Result<Self, BuiltinError> {
        let dir = &opts.data_dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| BuiltinError::Io {
                path: dir.clone(),
                source,
            })?;
        let files = [ROOT_CERT, ROOT_KEY, CA_CERT, CA_KEY];
        let (present, missing): (Vec<&'static str>, Vec<&'static str>) =
            files.iter().partition(|f| dir.join(f).exists());
        if present.is_empty() {
            return Self::create(opts, now);
        }
        if !missing.is_empty() {
            return Err(BuiltinError::Incomplete {
                dir: dir.clone(),
                present,
                missing,
            });
        }
        Self::load(dir)
    }

    /// True when this process created the CA (first start), false when it
    /// was loaded from the data directory.
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// The root certificate.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The intermediate certificate that signs leaves.
    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.intermediate
    }

    fn create(opts: &BuiltinOptions, now: OffsetDateTime) -> Result<Self, BuiltinError> {
        let dir = &opts.data_dir;
        let root_key = generate_ca_key(opts.key_algorithm)?;
        let mut root_params = ca_params(&opts.organization, "meshward root CA", None);
        root_params.not_before = now - time::Duration::minutes(5);
        root_params.not_after = now + opts.root_ttl;
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(|e| BuiltinError::Create(format!("self-signing the root: {e}")))?;
        let root_issuer = rcgen::Issuer::from_params(&root_params, &root_key);

        let ca_key = generate_ca_key(opts.key_algorithm)?;
        let mut ca_params = ca_params(&opts.organization, "meshward intermediate CA", Some(0));
        ca_params.not_before = root_params.not_before;
        ca_params.not_after = (now + opts.intermediate_ttl).min(root_params.not_after);
        let ca_cert = ca_params
            .signed_by(&ca_key, &root_issuer)
            .map_err(|e| BuiltinError::Create(format!("signing the intermediate: {e}")))?;

        // Keys first, then certificates, so a crash never leaves certificates
        // whose keys are lost.
        write_file(
            &dir.join(ROOT_KEY),
            root_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&dir.join(ROOT_CERT), root_cert.pem().as_bytes(), 0o644)?;
        write_file(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
        let chain = format!("{}{}", ca_cert.pem(), root_cert.pem());
        write_file(&dir.join(CERT_CHAIN), chain.as_bytes(), 0o644)?;

        let validity = SigningValidity {
            not_before: ca_params.not_before,
            not_after: ca_params.not_after,
        };
        Ok(Self {
            root: root_cert.der().clone(),
            intermediate: ca_cert.der().clone(),
            signer: rcgen::Issuer::new(ca_params, ca_key),
            validity,
            created: true,
        })
    }

    fn load(dir: &Path) -> Result<Self, BuiltinError> {
        let root = read_cert(&dir.join(ROOT_CERT))?;
        let intermediate = read_cert(&dir.join(CA_CERT))?;
        let key_path = dir.join(CA_KEY);
        check_key_mode(&key_path)?;
        check_key_mode(&dir.join(ROOT_KEY))?;
        let key_pem = read_string(&key_path)?;
        let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| BuiltinError::Invalid {
            path: key_path.clone(),
            reason: format!("not a usable PKCS#8 private key: {e}"),
        })?;
        let ca_path = dir.join(CA_CERT);
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&intermediate)
            .map_err(|e| BuiltinError::Invalid {
                path: ca_path.clone(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if parsed.public_key().raw != ca_key.subject_public_key_info().as_slice() {
            return Err(BuiltinError::Invalid {
                path: key_path,
                reason: format!("key does not match the certificate in {CA_CERT}"),
            });
        }
        let validity = SigningValidity {
            not_before: parsed.validity().not_before.to_datetime(),
            not_after: parsed.validity().not_after.to_datetime(),
        };
        verify_signed_by(&intermediate, &root).map_err(|reason| BuiltinError::Invalid {
            path: ca_path.clone(),
            reason,
        })?;
        let signer = rcgen::Issuer::from_ca_cert_der(&intermediate, ca_key).map_err(|e| {
            BuiltinError::Invalid {
                path: ca_path,
                reason: format!("cannot sign with it: {e}"),
            }
        })?;
        Ok(Self {
            root,
            intermediate,
            signer,
            validity,
            created: false,
        })
    }

    /// Sign a leaf synchronously (the work is CPU-only and short).
    pub fn sign_now(&self, req: &IssueRequest) -> Result<IssuedChain, IssueError> {
        let leaf = super::sign_leaf(req, &self.signer).map_err(|reason| IssueError::Internal {
            backend: "builtin",
            reason,
        })?;
        Ok(IssuedChain {
            leaf,
            intermediates: vec![self.intermediate.clone()],
            roots: vec![self.root.clone()],
        })
    }
}

impl Issuer for BuiltinIssuer {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a> {
        Box::pin(async move { self.sign_now(req) })
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }

    fn signing_validity(&self) -> SigningValidity {
        self.validity
    }

    fn signs_crls(&self) -> bool {
        true
    }

    fn sign_crl(&self, crl: &super::CrlRequest) -> Result<Vec<u8>, String> {
        super::sign_crl_with(crl, &self.signer)
    }
}

fn ca_params(org: &str, cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(super::random_serial());
    params.use_authority_key_identifier_extension = true;
    params
}

/// Generate a CA key. RSA keys come from the `rsa` crate (ring cannot
/// generate them) and are handed to rcgen as PKCS#8.
pub fn generate_ca_key(alg: CaKeyAlgorithm) -> Result<KeyPair, BuiltinError> {
    match alg {
        CaKeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| BuiltinError::Create(format!("generating a P-256 key: {e}"))),
        CaKeyAlgorithm::Rsa2048 => {
            let der = generate_rsa_pkcs8(2048).map_err(BuiltinError::Create)?;
            KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_RSA_SHA256)
                .map_err(|e| BuiltinError::Create(format!("loading the RSA key: {e}")))
        }
    }
}

/// Generate an RSA private key of `bits` bits, PKCS#8 DER.
pub fn generate_rsa_pkcs8(bits: usize) -> Result<Vec<u8>, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits)
        .map_err(|e| format!("generating an RSA-{bits} key: {e}"))?;
    let doc = key
        .to_pkcs8_der()
        .map_err(|e| format!("encoding the RSA key as PKCS#8: {e}"))?;
    Ok(doc.as_bytes().to_vec())
}

fn verify_signed_by(child: &[u8], parent: &[u8]) -> Result<(), String> {
    let (_, child) = x509_parser::certificate::X509Certificate::from_der(child)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let (_, parent) = x509_parser::certificate::X509Certificate::from_der(parent)
        .map_err(|e| format!("root is not an X.509 certificate: {e}"))?;
    child
        .verify_signature(Some(parent.public_key()))
        .map_err(|e| format!("not signed by the root in {ROOT_CERT}: {e}"))
}

fn read_string(path: &Path) -> Result<String, BuiltinError> {
    fs::read_to_string(path).map_err(|source| BuiltinError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, BuiltinError> {
    let text = read_string(path)?;
    let block = pem::parse(text.as_bytes()).map_err(|e| BuiltinError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not PEM: {e}"),
    })?;
    if block.tag() != "CERTIFICATE" {
        return Err(BuiltinError::Invalid {
            path: path.to_path_buf(),
            reason: format!("expected a CERTIFICATE block, found {}", block.tag()),
        });
    }
    Ok(CertificateDer::from(block.into_contents()))
}

fn check_key_mode(path: &Path) -> Result<(), BuiltinError> {
    let meta = fs::metadata(path).map_err(|source| BuiltinError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(BuiltinError::Invalid {
            path: path.to_path_buf(),
            reason: format!("private key is readable by others (mode {mode:o}); chmod 600 it"),
        });
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), BuiltinError> {
    let io = |source| BuiltinError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}
