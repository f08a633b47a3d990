//! The directory sink: `root-cert.pem` (concatenated PEM roots, what Istio
//! mounts) and `bundle.jwks.json` (the SPIFFE bundle) in one directory.
//!
//! Each file is replaced atomically: written to a temporary file in the same
//! directory, fsynced, renamed over the old one, then the directory fsynced.
//! A reader sees the old file or the new one, never a torn one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{BundleError, BundleSink, SinkFuture, TrustBundle};

/// PEM roots file name.
pub const ROOT_CERT_PEM: &str = "root-cert.pem";
/// SPIFFE bundle file name.
pub const BUNDLE_JWKS: &str = "bundle.jwks.json";

/// Writes the bundle into a directory.
#[derive(Debug, Clone)]
pub struct DirSink {
    dir: PathBuf,
}

impl DirSink {
    /// A sink writing into `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Write both files now (blocking).
    pub fn write(&self, bundle: &TrustBundle) -> Result<(), BundleError> {
        let err = |reason: String| BundleError::Sink {
            sink: "dir",
            reason,
        };
        fs::create_dir_all(&self.dir)
            .map_err(|e| err(format!("creating {}: {e}", self.dir.display())))?;
        let jwks = bundle.to_jwks()?.to_json()?;
        write_atomic(&self.dir, BUNDLE_JWKS, jwks.as_bytes()).map_err(err)?;
        write_atomic(&self.dir, ROOT_CERT_PEM, bundle.roots_pem().as_bytes()).map_err(err)?;
        Ok(())
    }
}

impl BundleSink for DirSink {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn publish<'a>(&'a self, bundle: &'a TrustBundle) -> SinkFuture<'a> {
        let this = self.clone();
        let bundle = bundle.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.write(&bundle))
                .await
                .map_err(|e| BundleError::Sink {
                    sink: "dir",
                    reason: format!("blocking task failed: {e}"),
                })?
        })
    }
}

/// Replace `dir/name` with `data` atomically.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), String> {
    let target = dir.join(name);
    // A per-process, per-call temporary name: concurrent writers never share one.
    let tmp = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        f.write_all(data)
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        f.sync_all()
            .map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
        drop(f);
        fs::rename(&tmp, &target)
            .map_err(|e| format!("renaming onto {}: {e}", target.display()))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("syncing {}: {e}", dir.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Jwks;
    use super::super::test_roots::root;
    use super::*;

    #[test]
    fn dir_sink_writes_pem_and_jwks_and_leaves_no_temp_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bundle");
        let roots = vec![
            root(&rcgen::PKCS_ECDSA_P256_SHA256, "a"),
            root(&rcgen::PKCS_ECDSA_P256_SHA256, "b"),
        ];
        let b = TrustBundle::new("td", roots.clone(), 7, Duration::from_secs(60)).unwrap();
        let sink = DirSink::new(&dir);
        sink.write(&b).unwrap();
        // Rewriting (resync) replaces, not appends.
        sink.write(&b).unwrap();
        let pem_text = fs::read_to_string(dir.join(ROOT_CERT_PEM)).unwrap();
        let parsed: Vec<_> = pem::parse_many(pem_text.as_bytes())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect();
        assert_eq!(parsed, roots.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
        let (doc, jroots) =
            Jwks::parse_x509_roots(&fs::read_to_string(dir.join(BUNDLE_JWKS)).unwrap()).unwrap();
        assert_eq!(doc.spiffe_sequence, 7);
        assert_eq!(jroots, roots);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
