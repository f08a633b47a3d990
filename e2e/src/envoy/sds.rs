//! File-based SDS: the two secrets istio-agent serves to its Envoy,
//! `default` (the workload's chain and key) and `ROOTCA` (the trust bundle),
//! as files in one directory that Envoy watches.
//!
//! Each secret is one file holding a discovery response with one
//! `envoy.extensions.transport_sockets.tls.v3.Secret`. A new version is
//! written to a temporary name in the same directory and renamed over the
//! old one: Envoy's `watched_directory` reacts to the move and re-reads the
//! file, so it never sees half a secret, and new handshakes use the new
//! certificate without a restart (connections already open keep theirs).

use std::path::{Path, PathBuf};

use serde_json::json;

/// The secret names Istio uses.
pub const DEFAULT: &str = "default";
/// The trust bundle's secret name.
pub const ROOTCA: &str = "ROOTCA";

/// A directory of SDS secret files.
#[derive(Debug, Clone)]
pub struct SdsDir {
    dir: PathBuf,
}

impl SdsDir {
    /// Creates (if needed) the directory.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The `sds_config` an Envoy transport socket uses for secret `name`.
    pub fn sds_config(&self, name: &str) -> serde_json::Value {
        json!({
            "name": name,
            "sds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": self.file(name).to_string_lossy(),
                    "watched_directory": {"path": self.dir.to_string_lossy()},
                },
            },
        })
    }

    /// Writes `default`: the chain (leaf first) and the private key, PEM.
    pub fn write_default(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        self.write(
            DEFAULT,
            &json!({
                "tls_certificate": {
                    "certificate_chain": {"inline_string": chain_pem},
                    "private_key": {"inline_string": key_pem},
                },
            }),
        )
    }

    /// Writes `ROOTCA`: every trusted root, PEM, and the CA's CRL when
    /// there is one (what istio-agent adds from the mounted `istio-ca-crl`
    /// ConfigMap). The CRL is the issuing CA's; the roots publish none, so
    /// only the leaf is checked against it (`only_verify_leaf_cert_crl`),
    /// else BoringSSL would want a CRL for every CA of the chain.
    pub fn write_rootca(&self, roots_pem: &str, crl_pem: Option<&str>) -> anyhow::Result<()> {
        let mut ctx = json!({"trusted_ca": {"inline_string": roots_pem}});
        if let (Some(crl), Some(obj)) = (crl_pem, ctx.as_object_mut()) {
            obj.insert("crl".into(), json!({"inline_string": crl}));
            obj.insert("only_verify_leaf_cert_crl".into(), json!(true));
        }
        self.write(ROOTCA, &json!({"validation_context": ctx}))
    }

    fn write(&self, name: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        let mut secret = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name,
        });
        if let (Some(s), Some(b)) = (secret.as_object_mut(), body.as_object()) {
            s.extend(b.clone());
        }
        let doc = json!({"resources": [secret]});
        let tmp = self.dir.join(format!(".{name}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&doc)?)?;
        std::fs::rename(&tmp, self.file(name))?;
        Ok(())
    }
}
