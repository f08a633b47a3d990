//! An istio-agent-like CA client, and a stand-in for the Kubernetes API
//! server's token signer. Used by the tests, the e2e mesh, the demo and the
//! benchmarks — and usable against any Istio-compatible CA.
//!
//! - [`WorkloadKey`]: a P-256 or RSA-2048 key and its CSR for a SPIFFE ID;
//! - [`CaClient`]: `CreateCertificate` over TLS with a bearer token (and
//!   optionally a client certificate), returning the parsed chain;
//! - [`token::TokenIssuer`]: mints Kubernetes-style service-account JWTs and
//!   writes the matching JWKS / PEM for the signer's config.

pub mod token;

use std::net::SocketAddr;
use std::time::Duration;

use meshward_proto::auth::IstioCertificateRequest;
use meshward_proto::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spiffe::SpiffeId;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What went wrong on the client side (server refusals are
/// [`ClientError::Status`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Key generation or CSR creation failed.
    #[error("key/CSR: {0}")]
    Key(String),
    /// Could not connect.
    #[error("connecting to the CA: {0}")]
    Connect(String),
    /// The CA answered with a gRPC error.
    #[error("CA refused: {} {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The CA's answer is not a usable chain.
    #[error("CA response: {0}")]
    Response(String),
    /// A token could not be made.
    #[error("token: {0}")]
    Token(String),
}

/// Key types a workload may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKeyType {
    /// ECDSA P-256 (istio-agent's default with `ECC_SIGNATURE_ALGORITHM`).
    EcdsaP256,
    /// RSA-2048 (istio-agent's default).
    Rsa2048,
}

/// A workload's private key.
pub struct WorkloadKey {
    key: KeyPair,
    kind: WorkloadKeyType,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generate a new key.
    pub fn generate(kind: WorkloadKeyType) -> Result<Self, ClientError> {
        let key = match kind {
            WorkloadKeyType::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                .map_err(|e| ClientError::Key(e.to_string()))?,
            WorkloadKeyType::Rsa2048 => {
                let der =
                    crate::issuer::builtin::generate_rsa_pkcs8(2048).map_err(ClientError::Key)?;
                KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(der),
                    &PKCS_RSA_SHA256,
                )
                .map_err(|e| ClientError::Key(e.to_string()))?
            }
        };
        Ok(Self { key, kind })
    }

    /// The key type.
    pub fn kind(&self) -> WorkloadKeyType {
        self.kind
    }

    /// The rcgen key pair (to build unusual CSRs in tests).
    pub fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// PKCS#8 PEM.
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }

    /// A CSR as istio-agent makes it: empty subject, the SPIFFE ID as the
    /// only (URI) SAN.
    pub fn csr_pem(&self, spiffe_id: &SpiffeId) -> Result<String, ClientError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(spiffe_id.to_string())
            .map_err(|e| ClientError::Key(e.to_string()))?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| ClientError::Key(e.to_string()))?;
        csr.pem().map_err(|e| ClientError::Key(e.to_string()))
    }
}

/// A chain returned by the CA, as sent and parsed.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// `cert_chain` exactly as received.
    pub cert_chain: Vec<String>,
    /// The leaf.
    pub leaf: CertificateDer<'static>,
    /// Intermediates (the entries between the first and the last).
    pub intermediates: Vec<CertificateDer<'static>>,
    /// Roots (every certificate of the last entry).
    pub roots: Vec<CertificateDer<'static>>,
}

impl IssuedCertificate {
    /// Parse an Istio `cert_chain` (leaf first, roots in the last entry).
    pub fn from_istio_chain(cert_chain: Vec<String>) -> Result<Self, ClientError> {
        if cert_chain.len() < 2 {
            return Err(ClientError::Response(format!(
                "{} chain entries; istio-agent needs at least 2",
                cert_chain.len()
            )));
        }
        let parse = |entry: &str| -> Result<Vec<CertificateDer<'static>>, ClientError> {
            let blocks =
                pem::parse_many(entry).map_err(|e| ClientError::Response(e.to_string()))?;
            if blocks.is_empty() {
                return Err(ClientError::Response("empty chain entry".to_string()));
            }
            Ok(blocks
                .into_iter()
                .map(|b| CertificateDer::from(b.into_contents()))
                .collect())
        };
        let mut entries = Vec::with_capacity(cert_chain.len());
        for e in &cert_chain {
            entries.push(parse(e)?);
        }
        let roots = entries.pop().unwrap_or_default();
        let mut rest = entries.into_iter();
        let leaf_entry = rest.next().unwrap_or_default();
        let [leaf] = <[CertificateDer<'static>; 1]>::try_from(leaf_entry).map_err(|v| {
            ClientError::Response(format!(
                "first entry has {} certificates, expected 1",
                v.len()
            ))
        })?;
        let intermediates = rest.flatten().collect();
        Ok(Self {
            cert_chain,
            leaf,
            intermediates,
            roots,
        })
    }

    /// Leaf and intermediates as one PEM string (a TLS certificate chain).
    pub fn chain_pem(&self) -> String {
        let mut s = crate::server::ca_service::to_pem(&self.leaf);
        for c in &self.intermediates {
            s.push_str(&crate::server::ca_service::to_pem(c));
        }
        s
    }
}

/// A connection to an Istio CA API endpoint.
#[derive(Debug, Clone)]
pub struct CaClient {
    inner: IstioCertificateServiceClient<Channel>,
}

/// Options for one `CreateCertificate` call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Bearer token for `authorization`.
    pub token: Option<String>,
    /// Requested validity in seconds (0 = the CA's default).
    pub validity_secs: i64,
    /// `ClusterID` header.
    pub cluster_id: Option<String>,
    /// `ImpersonatedIdentity` metadata (node agents only).
    pub impersonated_identity: Option<String>,
}

impl CaClient {
    /// A client over a channel connected elsewhere (a chosen local address,
    /// a proxy).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: IstioCertificateServiceClient::new(channel),
        }
    }

    /// Connect over TLS to `addr`, verifying the server against `roots_pem`
    /// for `server_name` (e.g. `localhost`, `istiod.istio-system.svc`).
    pub async fn connect(
        addr: SocketAddr,
        roots_pem: &str,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        Self::connect_inner(addr, roots_pem, server_name, None).await
    }

    /// Connect presenting a client certificate (mTLS renewal).
    pub async fn connect_with_client_cert(
        addr: SocketAddr,
        roots_pem: &str,
        server_name: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Self, ClientError> {
        Self::connect_inner(
            addr,
            roots_pem,
            server_name,
            Some(Identity::from_pem(chain_pem, key_pem)),
        )
        .await
    }

    async fn connect_inner(
        addr: SocketAddr,
        roots_pem: &str,
        server_name: &str,
        identity: Option<Identity>,
    ) -> Result<Self, ClientError> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(roots_pem))
            .domain_name(server_name);
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .tls_config(tls)
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .connect()
            .await
            .map_err(|e| ClientError::Connect(format!("{e:?}")))?;
        Ok(Self {
            inner: IstioCertificateServiceClient::new(channel),
        })
    }

    /// Send a raw CSR (PEM text, or anything, for tests of refusals).
    pub async fn create_certificate(
        &self,
        csr: &str,
        opts: &CallOptions,
    ) -> Result<Vec<String>, ClientError> {
        let metadata = opts
            .impersonated_identity
            .as_ref()
            .map(|id| prost_types::Struct {
                fields: [(
                    "ImpersonatedIdentity".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(id.clone())),
                    },
                )]
                .into_iter()
                .collect(),
            });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr.to_string(),
            validity_duration: opts.validity_secs,
            metadata,
        });
        if let Some(t) = &opts.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Token("token is not a valid header value".to_string()))?;
            request.metadata_mut().insert("authorization", v);
        }
        if let Some(c) = &opts.cluster_id {
            let v = c.parse().map_err(|_| {
                ClientError::Token("cluster id is not a valid header value".to_string())
            })?;
            request.metadata_mut().insert("clusterid", v);
        }
        let mut client = self.inner.clone();
        let response = client
            .create_certificate(request)
            .await
            .map_err(ClientError::Status)?;
        Ok(response.into_inner().cert_chain)
    }

    /// Do what istio-agent does: CSR for `spiffe_id` with `key`, send it
    /// with `opts`, parse the chain.
    pub async fn request_certificate(
        &self,
        key: &WorkloadKey,
        spiffe_id: &SpiffeId,
        opts: &CallOptions,
    ) -> Result<IssuedCertificate, ClientError> {
        let csr = key.csr_pem(spiffe_id)?;
        let chain = self.create_certificate(&csr, opts).await?;
        IssuedCertificate::from_istio_chain(chain)
    }
}
